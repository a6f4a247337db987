"""`lowvram tune`: measure roads and reserves on the running UI, keep the fastest (docs/architecture.md#tune)."""

from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lowvram.cli import render
from lowvram.cli.options import FactsOpt, JsonOpt, ProfileOpt, WebuiOpt, overrides_from

if TYPE_CHECKING:
    from lowvram.world.tune_session import Probe, TuneEvent, TuneResult

EXAMPLES = """
Examples:

  lowvram tune --webui ~/stable-diffusion-webui          # both roads where memory can spill, 15 minutes at most

  lowvram tune --roads resident --steps 3 --repeats 3    # only the reserve search, more runs per candidate

  lowvram tune --facts gtx1070.json --json               # facts from `doctor --json` stand for the GPU
"""


class RoadsChoice(str, enum.Enum):
    auto = "auto"
    swap = "swap"
    resident = "resident"


HELP = ("Start the UI (API only, loopback), measure s/it per reserve and road, keep the fastest: "
        "the next plan and launch use it.\n" + EXAMPLES)


def tune_cmd(  # noqa: PLR0917 - typer maps parameters to options
    webui: WebuiOpt = None,
    profile: ProfileOpt = None,
    width: Annotated[int | None, typer.Option("--width", help="Image width (default: the profile's target).")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Image height (default: the profile's target).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, max=150, help="Sampling steps per request.")] = 4,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=20,
                                         help="Measured requests per candidate (after one warm-up).")] = 2,
    roads: Annotated[RoadsChoice, typer.Option("--roads",
                                               help="auto = both where memory can spill; swap; resident.")] = RoadsChoice.auto,
    max_minutes: Annotated[float, typer.Option("--max-minutes", min=0.05, help="Stop searching after this long.")] = 15.0,
    facts: FactsOpt = None,
    as_json: JsonOpt = False,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", hidden=True, min=0.1)] = 600.0,
    request_timeout: Annotated[float, typer.Option("--request-timeout", hidden=True, min=0.1)] = 600.0,
    stop_timeout: Annotated[float, typer.Option("--stop-timeout", hidden=True, min=0.1)] = 10.0,
) -> None:
    from lowvram.world.tune_session import TuneError, TuneSettings, run_tune

    settings = TuneSettings(width=width, height=height, steps=steps, repeats=repeats, roads=roads.value,
                            max_minutes=max_minutes, ready_timeout_s=ready_timeout, request_timeout_s=request_timeout,
                            stop_timeout_s=stop_timeout)
    overrides = overrides_from(profile=profile)
    with _Reporter(quiet=as_json) as reporter:
        result = run_tune(webui=webui, facts_file=facts, overrides=overrides, settings=settings, report=reporter)
    failed = None
    if result.best is None:
        failed = TuneError(f"no candidate could be measured, every probe failed ({result.reason})",
                           "see the reasons in the probe table; `lowvram launch` shows the UI's own output")
    if as_json:
        # One document on stdout: the probes (with their reasons) and the error together.
        data = result.to_dict()
        if failed is not None:
            data["error"] = {"message": failed.message, "hint": failed.hint}
        render.emit_json(data)
    else:
        _print_result(result)
    if failed is not None:
        render.error(failed.message, failed.hint)
        raise typer.Exit(failed.exit_code)


class _Reporter:
    """Progress while tune runs: a bar while the UI starts, one line per probe (stderr)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_bar()

    def _end_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, event: TuneEvent) -> None:
        if event.kind == "waiting":
            if self.quiet or not sys.stderr.isatty():
                return
            if self.progress is None:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.progress = Progress(TextColumn("waiting for the UI's API"), BarColumn(), TimeElapsedColumn(),
                                         console=Console(stderr=True), transient=True)
                self.progress.start()
                self.task = self.progress.add_task("start", total=1.0)
            self.progress.update(self.task, completed=event.fraction or 0.0)
            return
        self._end_bar()
        if self.quiet and event.kind not in ("note",):
            return
        if event.kind == "probe" and event.probe is not None:
            p = event.probe
            what = f"{p.sit:.4f} s/it ({p.sit_source})" if p.ok and p.sit is not None else f"failed: {p.reason}"
            render.note(f"  {p.road:<8} {p.reserve_mb:>6} MiB  {what}")
        elif event.message:
            render.note(f"lowvram: {event.message}")


def _print_result(result: TuneResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, no_color=not render.use_colour())
    table = Table(title=f"probes at {result.width}×{result.height}, {result.steps} steps, "
                        f"{result.repeats} measured runs each", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("road")
    table.add_column("reserve MiB", justify="right")
    table.add_column("s/it", justify="right")
    table.add_column("from")
    table.add_column("result")
    for n, p in enumerate(result.probes, start=1):
        mark = "best" if p is result.best else ("start" if p is result.start else "")
        table.add_row(str(n), p.road, str(p.reserve_mb) if p.road == "resident" else "-",
                      f"{p.sit:.4f}" if p.sit is not None else "-", p.sit_source if p.ok else "-",
                      mark if p.ok else f"failed: {p.reason}")
    console.print(table)
    console.print(chart(result))
    for line in summary(result):
        print(line)


def _where(p: Probe) -> str:
    return f"{p.road} road" + (f", reserve {p.reserve_mb} MiB" if p.road == "resident" else "")


def summary(result: TuneResult) -> list[str]:
    """The lines under the table: the best, the start (measured or failed), the search, the tree."""
    lines: list[str] = []
    start, best = result.start, result.best
    if best is not None and best.sit is not None:
        line = f"best: {_where(best)} at {best.sit:.4f} s/it"
        if start is not None and start.ok and result.gain_pct is not None and start is not best:
            line += (f", {result.gain_pct:+.1f}% faster than the profile's start ({_where(start)}, "
                     f"{start.sit:.4f} s/it)")
        elif start is best:
            line += " (the profile's starting point was already the fastest)"
        lines.append(line)
    if start is not None and not start.ok:
        lines.append(f"the profile's starting point ({_where(start)}) failed: {start.reason}")
    lines.append(f"search: {'closed' if result.closed else 'not closed'} ({result.reason}); "
                 f"{result.saved} probes kept as observations (source tuning), which the next plan uses")
    lines.append("tune changed nothing in the WebUI: webui-user, the hook and its config are as they were before; "
                 "the next `lowvram launch` or `apply` plans with what tune measured")
    return lines


def chart(result: TuneResult, width: int = 40) -> str:
    """A bar per successful probe, grouped by road, longer = slower; the best is marked."""
    ok = [p for p in result.probes if p.ok and p.sit is not None]
    if not ok:
        return "(no successful probe to chart)"
    worst = max(p.sit or 0.0 for p in ok) or 1.0
    lines = ["s/it per reserve and road (shorter is faster)"]
    for road in ("resident", "swap"):
        rows = sorted((p for p in ok if p.road == road), key=lambda p: p.reserve_mb)
        seen: set[int] = set()
        for p in rows:
            if p.reserve_mb in seen:
                continue
            seen.add(p.reserve_mb)
            sit = p.sit or 0.0
            bar = "█" * max(1, round(sit / worst * width))
            label = f"{road:<8} {p.reserve_mb:>6}" if road == "resident" else f"{road:<8} {'-':>6}"
            mark = "  ◀ best" if p is result.best else ""
            lines.append(f"{label} {bar:<{width}} {sit:.4f}{mark}")
    return "\n".join(lines)
