"""`lowvram install-extensions`: the registry's extensions, pinned, into a WebUI (docs/architecture.md#the-cli-contract, docs/architecture.md#safety-on-the-users-tree)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from lowvram.cli import render
from lowvram.cli.options import JsonOpt, WebuiOpt
from lowvram.core.errors import WebuiError

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


def _looks_like_webui(path: Path) -> bool:
    return any((path / name).exists() for name in ("webui.sh", "webui.bat", "webui-user.sh", "webui-user.bat",
                                                   "launch.py")) or ((path / "comfy").is_dir()
                                                                     and (path / "main.py").exists())


def resolve_webui(explicit: Path | None, *, strict: bool = True) -> Path:
    """--webui, then $LOWVRAM_WEBUI, then the current directory if it is a WebUI, then the last used."""
    from lowvram.world import state

    if explicit is not None:
        path = explicit.expanduser()
        if not path.is_dir():
            raise WebuiError(f"{path} is not a folder", "pass the WebUI's folder with --webui PATH")
        if strict and not _looks_like_webui(path):
            raise WebuiError(f"{path} does not look like a WebUI (no webui.sh, webui.bat or launch.py)",
                             "pass the folder that holds webui.sh / webui-user.bat")
        return path.resolve()
    env = os.environ.get("LOWVRAM_WEBUI")
    if env:
        return resolve_webui(Path(env), strict=strict)
    cwd = Path.cwd()
    if _looks_like_webui(cwd):
        return cwd.resolve()
    last = state.last_webui()
    if last is not None and last.is_dir():
        return last.resolve()
    raise WebuiError("no WebUI found here", "pass --webui PATH (or set LOWVRAM_WEBUI)")


def detect_ui(webui: Path) -> str:
    """The WebUI's flavor, in the order of docs/architecture.md#detection (ComfyUI, SD.Next, Forge, A1111)."""
    if (webui / "comfy").is_dir() and (webui / "main.py").exists():
        return "comfyui"
    if (webui / "installer.py").exists():
        return "sdnext"
    if (webui / "modules_forge").is_dir() or (webui / "backend" / "args.py").exists():
        return "forge"
    return "a1111"


def render_extensions(rows: list[dict[str, Any]]) -> str:
    styles = {"installed": "ok", "up-to-date": "ok", "updated": "ok", "kept": "warn", "skipped": "skip",
              "failed": "fail", "removed": "ok", "restored": "ok", "gone": "skip"}
    return render.table(["extension", "status", "folder", "note"],
                        [[r["name"], r["status"], r.get("dir") or "", r.get("reason") or ""] for r in rows],
                        [styles.get(r["status"]) for r in rows])


def install_extensions(  # noqa: PLR0917 - one parameter per CLI option
    names: Annotated[list[str] | None, typer.Argument(metavar="[NAME]...", help="Registry names (default: every "
                                                      "entry that works on this UI).")] = None,
    webui: WebuiOpt = None,
    profile: Annotated[str | None, typer.Option("--profile", "-p", metavar="NAME",
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
      lowvram install-extensions --source giant-kitten=~/src/stable-diffusion-webui-giant-kitten
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
              "see the note column; offline, use --source NAME=URL or LOWVRAM_MIRROR=DIR")
    if json_out:
        data: dict[str, Any] = {"schema": 1, "webui": str(tree), "ui": ui, "extensions": rows}
        if code:
            data["error"] = {"message": failed[0], "hint": failed[1]}
        render.emit_json(data)
    else:
        print(f"extensions in {tree} ({ui}):")
        print(render_extensions(rows))
    if code:
        render.error(*failed)
    raise typer.Exit(code)
