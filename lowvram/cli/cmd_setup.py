"""`lowvram setup`: clone (or adopt) a WebUI at its pinned release, apply the plan, say how to start it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lowvram.cli.options import JsonOpt, ModelOpt, ProfileOpt, UiChoice
from lowvram.core.errors import UsageError
from lowvram.core.words import plural


def _parse_sources(values: list[str] | None) -> dict[str, str]:
    sources: dict[str, str] = {}
    for value in values or []:
        name, sep, url = value.partition("=")
        if not sep or not name.strip() or not url.strip():
            raise UsageError(f"--source {value!r} is not UI=URL", "e.g. --source a1111=/srv/mirror/stable-diffusion-webui.git")
        sources[name.strip()] = url.strip()
    return sources


def _mb(mb: int) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb} MB"


class _Bar:
    """A rich progress bar on stderr while git clones; silent when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._stage = ""

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, stage: str, done: float, total: float | None) -> None:
        if self._progress is None:
            return
        if self._task is None or stage != self._stage:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(stage, total=total)
            self._stage = stage
        self._progress.update(self._task, completed=done, total=total)

    def say(self, message: str) -> None:
        from lowvram.cli import render

        if self._progress is not None:
            self._progress.console.print(message, style="dim", highlight=False)
        elif self.enabled:
            render.note(message)


HELP = (
    "Install a WebUI at a pinned release (or adopt one already there), configure it for this GPU, "
    "and print the command that starts it.\n\n"
    "\b\nExample:\n  lowvram setup --ui a1111 --dir ~/sd/stable-diffusion-webui\n\n"
    "Offline: LOWVRAM_MIRROR=DIR clones from DIR/<ui>, or --source a1111=PATH|URL."
)


def setup_command(  # noqa: PLR0917 - one parameter per CLI option
    ui: Annotated[UiChoice | None, typer.Option("--ui", help="Which WebUI to install (default a1111).")] = None,
    directory: Annotated[
        Path | None,
        typer.Option("--dir", metavar="PATH",
                     help="Where to put it (default: a folder in lowvram's data dir). An existing tree of that UI is adopted."),
    ] = None,
    ref: Annotated[
        str | None,
        typer.Option("--ref", metavar="TAG|COMMIT", help="Check out this tag or commit instead of lowvram's pinned release."),
    ] = None,
    profile: ProfileOpt = None,
    model: ModelOpt = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", metavar="UI=URL", help="Clone UI from this URL or local repository (offline machines)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    from lowvram.cli import render
    from lowvram.world import setup_ui

    sources = _parse_sources(source)
    with _Bar(enabled=not as_json) as bar:
        result = setup_ui.setup(
            ui=ui.value if ui else None,
            target=directory,
            ref=ref,
            profile=profile,
            model=model.strip() if model and model.strip() else None,
            sources=sources,
            progress=bar.update,
            stage=bar.say,
        )
    if as_json:
        render.emit_json(result.to_dict())
        raise typer.Exit(result.exit_code)
    _print_human(result)
    raise typer.Exit(result.exit_code)


def _print_human(result: Any) -> None:
    from lowvram.cli import render

    where = str(result.dir)
    if result.adopted:
        how = "adopted the existing tree (nothing cloned)"
    elif result.resumed:
        how = "resumed an interrupted setup"
    else:
        how = f"cloned from {result.source}"
    at = result.tag or (result.commit[:12] if result.commit else "unknown version")
    if result.tag and result.commit:
        at = f"{result.tag} ({result.commit[:12]})"
    print(render.lead(f"{result.ui} {at}", f"in {where}", "bold"))
    print(f"  {how}")
    if result.cleaned:
        print(render.wrap(f"  removed {plural(len(result.cleaned), 'half-made clone')} left by an interrupted run; "
                          "started clean"))
    if result.profile:
        print(f"  profile: {result.profile}")
    apply = result.apply or {}
    plan = apply.get("plan") or {}
    if plan.get("args"):
        print(render.wrap("  flags: " + " ".join(plan["args"]), hang=4))
    for change in apply.get("changes") or []:
        if isinstance(change, dict) and change.get("action") != "unchanged":
            print(render.wrap(f"  {change.get('action')}: {change.get('path')}", hang=4))
    for ext in apply.get("extensions") or []:
        if isinstance(ext, dict):
            reason = f" ({ext['reason']})" if ext.get("reason") else ""
            print(render.wrap(f"  extension {ext.get('name')}: {ext.get('status')}{reason}", hang=4))
    for warning in result.warnings:
        render.warn(warning)
    for note in result.notes:
        print(render.style(render.wrap(f"note: {note}", hang=6), "dim"))
    print()
    if result.before_launch:
        print("Before the first start:")
        for cmd in result.before_launch:
            print(f"  {cmd}")
    print("Start it with:")
    print("  " + render.style(result.launch_command, "bold"))
    if result.first_start:
        print(f"The first start downloads about {_mb(result.first_start_download_mb)}:")
        for item in result.first_start:
            print(render.wrap(f"  - {item.what}: {_mb(item.download_mb)} ({_mb(item.disk_mb)} on disk)", hang=4))
