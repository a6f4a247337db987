"""`lowvram install-extensions`: the registry's extensions, pinned, into a WebUI (docs/architecture.md#the-cli-contract, docs/architecture.md#safety-on-the-users-tree)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from lowvram.cli import render
from lowvram.cli.options import JsonOpt, WebuiOpt, complete_profile_name

ProgressCb = Callable[[str, float, float | None], None]


@contextlib.contextmanager
def clone_progress(enabled: bool) -> Iterator[ProgressCb | None]:
    """A rich progress bar on stderr fed by gitops' callback; nothing when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("cloning", total=None)

        def update(stage: str, current: float, total: float | None) -> None:
            bar.update(task, description=stage, completed=current, total=total)

        yield update


def resolve_webui(explicit: Path | None, *, strict: bool = True) -> Path:
    """The WebUI by the one lookup rule every command uses (`world/detect`'s `locate_webui`); none is
    one error line. `strict=False` (revert) also takes a folder lowvram applied a plan to."""
    from lowvram.world.detect import require_webui

    return require_webui(explicit, why="extensions go into a WebUI's extensions/ folder" if strict
                         else "revert takes out what apply put into one", applied_ok=not strict)


def detect_ui(webui: Path) -> str:
    """The WebUI's flavor (`world/detect`'s `detect_flavor`); A1111 for a folder only lowvram's
    manifest vouches for (revert)."""
    from lowvram.world.detect import detect_flavor

    return detect_flavor(webui) or "a1111"


# In a dry run nothing was installed or updated: the status says what apply would do.
DRY_RUN_STATUS = {"installed": "would install", "updated": "would update"}


def render_extensions(rows: list[dict[str, Any]], dry_run: bool = False) -> str:
    """One row per extension (name, status, folder), then its note on lines of their own: a note holds
    URLs and commits, which a column beside the folder name would have to cut."""
    styles = {"installed": "ok", "up-to-date": "ok", "updated": "ok", "kept": "warn", "skipped": "skip",
              "failed": "fail", "removed": "ok", "restored": "ok", "gone": "skip"}
    table = render.table(["extension", "status", "folder"],
                         [[r["name"], DRY_RUN_STATUS.get(r["status"], r["status"]) if dry_run else r["status"],
                           r.get("dir") or ""] for r in rows],
                         [styles.get(r["status"]) for r in rows], no_wrap=(0, 1))
    notes = [render.wrap(f"  {r['name']}: {r['reason']}", hang=4) for r in rows if r.get("reason")]
    return "\n".join([table, *notes])


def install_extensions(  # noqa: PLR0917 - one parameter per CLI option
    names: Annotated[list[str] | None, typer.Argument(metavar="[NAME]...", help="Registry names (default: every "
                                                      "entry that works on this UI).")] = None,
    webui: WebuiOpt = None,
    profile: Annotated[str | None, typer.Option("--profile", "-p", metavar="NAME",
                                                autocompletion=complete_profile_name,
                                                help="Install what this profile lists.")] = None,
    source: Annotated[list[str] | None, typer.Option("--source", metavar="NAME=URL",
                                                     help="Install NAME from URL (a local clone, file://, a mirror); "
                                                          "repeatable.")] = None,
    update: Annotated[bool, typer.Option("--update", help="Move clean checkouts to the registry's pin.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Install the extensions lowvram works with (VRAM Estimator, giant-kitten), pinned, with git.

    A checkout with local changes or another remote is never touched. Offline: --source NAME=URL
    or LOWVRAM_MIRROR=DIR (DIR/vram-estimator, DIR/giant-kitten).

    \b
    Examples:
      lowvram install-extensions
      lowvram install-extensions vram-estimator --update
      lowvram install-extensions \\
          --source giant-kitten=~/src/stable-diffusion-webui-giant-kitten
    """
    from lowvram.world import fsutil, paths
    from lowvram.world.apply import check_writable, clean_stale
    from lowvram.world.apply import extensions as ext_mod
    from lowvram.world.apply.manifest import Manifest

    tree = resolve_webui(webui)
    ui = detect_ui(tree)
    sources = ext_mod.parse_sources(source or [])
    registry = ext_mod.load_registry()
    wanted = list(names or [])
    if profile:
        from lowvram.world.profile_files import load_profile

        wanted += list(load_profile(profile).profile.extensions)
    wanted += [n for n in sources if n not in wanted]
    if not wanted:
        wanted = [n for n, e in registry.items() if e.skip_reason(ui) is None]
    entries = ext_mod.resolve_names(wanted, registry)
    if ui == "comfyui":
        results = [ext_mod.install_one(tree, e, Manifest(webui=tree), ui=ui) for e in entries]
    else:
        with fsutil.webui_lock(paths.lock_path(tree), what=f"the WebUI at {tree}"):
            clean_stale(tree)
            manifest = Manifest.load(tree)
            # Before the first write: git there and allowed in the checkouts, the folders writable.
            check_writable(ext_mod.preflight(tree, entries, manifest, ui=ui, sources=sources, update=update))
            with clone_progress(not json_out) as progress:
                results = ext_mod.install(tree, entries, manifest, ui=ui, sources=sources, update=update,
                                          progress=progress)
            if manifest.exists and manifest.empty:
                manifest.delete()
    rows = [r.to_dict() for r in results]
    code = 1 if any(r.status == "failed" for r in results) else 0
    failed = ("some extensions could not be installed",
              "see the notes under the table; offline, use --source NAME=URL or LOWVRAM_MIRROR=DIR")
    if json_out:
        data: dict[str, Any] = {"schema": 1, "webui": str(tree), "ui": ui, "extensions": rows}
        if code:
            data["error"] = {"message": failed[0], "hint": failed[1]}
        render.emit_json(data)
    else:
        print(render.wrap(f"extensions in {tree} ({ui}):"))
        print(render_extensions(rows))
    if code:
        render.error(*failed)
    raise typer.Exit(code)
