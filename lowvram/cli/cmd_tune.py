"""`lowvram tune`: measure roads and reserves on the running UI, keep the fastest (docs/architecture.md#tune)."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lowvram.cli import render
from lowvram.cli.options import FactsOpt, JsonOpt, ProfileOpt, WebuiOpt, overrides_from
from lowvram.core.words import plural

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lowvram.core.plan import Overrides, Plan
    from lowvram.world.applied import Applied
    from lowvram.world.tune import Probe, TuneEvent, TuneResult

EXAMPLES = """
Examples:

\b
  # both ways where VRAM can spill, 15 minutes at most
  lowvram tune --webui ~/stable-diffusion-webui
  # only the reserve search, more runs per candidate
  lowvram tune --roads resident --steps 3 --repeats 3
  # facts from `doctor --json` stand for the GPU
  lowvram tune --facts gtx1070.json --json
  # ComfyUI: --reserve-vram swept, your own flags after --
  lowvram tune --webui ~/ComfyUI -- --preview-method none
"""


class RoadsChoice(str, enum.Enum):
    auto = "auto"
    swap = "swap"
    resident = "resident"


HELP = ("Start the UI (API only, loopback), measure s/it for each reserve and each way to run the model (swap "
        "parts of it to RAM, or keep it in VRAM and reserve memory), keep the fastest: the next plan and launch "
        "use it.\n" + EXAMPLES)


def tune_cmd(  # noqa: PLR0917 - typer maps parameters to options
    extra: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- EXTRA", help="ComfyUI only: your own flags for its command line, after `--`."),
    ] = None,
    webui: WebuiOpt = None,
    profile: ProfileOpt = None,
    width: Annotated[int | None, typer.Option("--width", metavar="PX",
                                              help="Image width (default: the profile's target).")] = None,
    height: Annotated[int | None, typer.Option("--height", metavar="PX",
                                               help="Image height (default: the profile's target).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, max=150, metavar="N", help="Sampling steps per request.")] = 4,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=20, metavar="N",
                                         help="Measured requests per candidate (after one warm-up).")] = 2,
    roads: Annotated[RoadsChoice, typer.Option(
        "--roads", help="swap = swap parts of the model to RAM; resident = keep the model in VRAM and reserve "
                        "memory; auto = both where VRAM can spill into RAM.")] = RoadsChoice.auto,
    max_minutes: Annotated[float, typer.Option("--max-minutes", min=0.05, metavar="MINUTES",
                                               help="Stop searching after this long.")] = 15.0,
    facts: FactsOpt = None,
    as_json: JsonOpt = False,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", hidden=True, min=0.1)] = 600.0,
    request_timeout: Annotated[float, typer.Option("--request-timeout", hidden=True, min=0.1)] = 600.0,
    stop_timeout: Annotated[float, typer.Option("--stop-timeout", hidden=True, min=0.1)] = 10.0,
    max_candidates: Annotated[int | None, typer.Option("--max-candidates", hidden=True, min=1)] = None,
) -> None:
    from lowvram.world.tune import TuneError, TuneSettings, run_tune

    settings = TuneSettings(width=width, height=height, steps=steps, repeats=repeats, roads=roads.value,
                            max_minutes=max_minutes, ready_timeout_s=ready_timeout, request_timeout_s=request_timeout,
                            stop_timeout_s=stop_timeout, extra_args=tuple(extra or ()), max_candidates=max_candidates)
    overrides = overrides_from(profile=profile)
    with _Reporter(quiet=as_json) as reporter:
        result = run_tune(webui=webui, facts_file=facts, overrides=overrides, settings=settings, report=reporter)
    failed = None
    if result.best is None:
        failed = TuneError(f"no candidate could be measured, every probe failed ({result.reason})",
                           "see the reasons in the probe table; `lowvram launch` shows the UI's own output")
    tree = _tree(result, facts, overrides) if failed is None else None
    if as_json:
        # One document on stdout: the probes (with their reasons) and the error together.
        data = result.to_dict()
        if tree is not None:
            data["tree"] = {"file": tree[0].file, "holds_tuned_plan": tree[0].current, "message": tree[1]}
        if failed is not None:
            data["error"] = {"message": failed.message, "hint": failed.hint}
        render.emit_json(data)
    else:
        _print_result(result)
        if tree is not None:
            print(render.wrap(tree[1]))
    if failed is not None:
        render.error(failed.message, failed.hint)
        raise typer.Exit(failed.exit_code)


def _plan_words(road: str | None, reserve_mb: int | None, args: Sequence[str]) -> str:
    """A plan in the user's words: how the model runs, the reserve, the flags."""
    from lowvram.core.words import road_words

    if road == "resident" and reserve_mb is not None:
        parts = [f"keep the model in VRAM and reserve {reserve_mb} MiB"]
    else:
        parts = [road_words(road)] if road else []
    parts.append("flags " + " ".join(args) if args else "no flags")
    return ", ".join(parts)


def tree_message(plan: Plan, applied: Applied) -> str:
    """After tune: does the WebUI's managed block still hold the plan from before, and how to apply the tuned one."""
    if plan.ui == "comfyui":  # no webui-user file: the flags go on main.py's command line at each start
        flags = " ".join(plan.args) or "no flags"
        return (f"ComfyUI reads its flags at start: `lowvram launch` starts it with the tuned plan ({flags}); "
                "if you start it yourself, pass those flags")
    tuned = _plan_words(plan.road, plan.reserve.mb if plan.reserve.applied else None, plan.args)
    if applied.file is None:
        return (f"nothing is applied in this WebUI yet: `lowvram apply` writes the tuned plan ({tuned}); "
                "`lowvram launch` applies it and starts the UI")
    if applied.current:
        return f"{applied.file} already holds the tuned plan ({tuned}): nothing to apply"
    before = _plan_words(applied.road, applied.reserve_mb, applied.args)
    return (f"{applied.file} still holds the plan applied before tuning ({before}); the tuned plan is: {tuned}. "
            "Run `lowvram apply` to write it (`lowvram launch` applies it as it starts; starting the UI yourself "
            "runs the older plan until then)")


def _tree(result: TuneResult, facts: Path | None, overrides: Overrides) -> tuple[Applied, str] | None:
    """What the tree holds after tune against the plan `apply` would now write (None: cannot tell)."""
    from lowvram.core.errors import LowvramError
    from lowvram.world.applied import applied_against
    from lowvram.world.plan_inputs import make_plan

    try:
        plan = make_plan(webui=Path(result.webui), facts_file=facts, overrides=overrides).plan
        applied = applied_against(plan, Path(result.webui))
    except LowvramError:
        return None
    return applied, tree_message(plan, applied)


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
            if p.swap_method:
                render.note(f"  forge    {_forge_words(p)}  {what}")
                return
            render.note(f"  {_comfy_words(p)}  {what}" if p.load_mode else f"  {p.road:<8} {p.reserve_mb:>6} MiB  {what}")
        elif event.message:
            render.note(f"lowvram: {event.message}")


def _print_result(result: TuneResult) -> None:
    from rich.table import Table

    table = Table(title=f"probes at {result.width}×{result.height}, {plural(result.steps, 'step')}, "
                        f"{plural(result.repeats, 'measured run')} each", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("road")
    table.add_column("reserve MiB", justify="right")
    table.add_column("s/it", justify="right")
    table.add_column("from")
    table.add_column("result")
    for n, p in enumerate(result.probes, start=1):
        mark = "best" if p is result.best else ("start" if p is result.start else "")
        table.add_row(str(n), p.road, _reserve_cell(p),
                      f"{p.sit:.4f}" if p.sit is not None else "-", p.sit_source if p.ok else "-",
                      mark if p.ok else f"failed: {p.reason}")
    table.columns[-1].overflow = "fold"
    print(render.render_rich(table))
    print(render.wrap(chart(result, width=max(8, min(40, render.screen_width() - 34)))))
    for line in summary(result):
        print(render.wrap(line))


def _where(p: Probe) -> str:
    """A probe in the user's words (the table's road column has the short name)."""
    from lowvram.core.words import road_words

    if p.load_mode:
        return f"ComfyUI with {_comfy_words(p)}"
    if p.swap_method:
        return (f"Forge with inference memory {p.reserve_mb} MiB (GPU Weights = total − it), Swap Method "
                f"{p.swap_method}, Swap Location {p.swap_location}")
    if p.road == "resident":
        return f"resident (model kept in VRAM, reserve {p.reserve_mb} MiB)"
    return "swap (parts of the model swapped to RAM)" if p.road == "swap" else road_words(p.road)


def summary(result: TuneResult) -> list[str]:
    """The lines under the table: the best, the start (measured or failed), the search, the tree."""
    lines: list[str] = []
    start, best = result.start, result.best
    if best is not None and best.sit is not None:
        # Per image where both were timed so (s/it hides --medvram's model moves), as tune compared them.
        per_image = best.wall_s is not None and (start is None or start.wall_s is not None)

        def speed(p: Probe) -> str:
            return f"{p.wall_s:.3f} s/image ({p.sit or 0.0:.4f} s/it)" if per_image else f"{p.sit or 0.0:.4f} s/it"

        line = f"best: {_where(best)} at {speed(best)}"
        if start is not None and start.ok and result.gain_pct is not None and start is not best:
            line += (f", {result.gain_pct:+.1f}% faster than the profile's start, {_where(start)} at "
                     f"{speed(start)}")
        elif start is best:
            line += " (the profile's starting point was already the fastest)"
        lines.append(line)
    if start is not None and not start.ok:
        lines.append(f"the profile's starting point ({_where(start)}) failed: {start.reason}")
    lines.append(f"search: {'closed' if result.closed else 'not closed'} ({result.reason}); "
                 f"{plural(result.saved, 'probe')} kept as observations (source tuning), which the next plan uses")
    if "forge" in result.roads:
        lines.append("tune changed nothing in the WebUI: webui-user and Forge's config.json (every option tune posted) "
                     "are as they were before; the next `lowvram plan` uses the fastest settings, and `lowvram apply` "
                     "writes them into config.json")
    elif "comfyui" in result.roads:
        lines.append("tune changed nothing in the ComfyUI tree: its images went to a temp folder, since removed, and "
                     "user/, temp/, output/ and input/ are as they were; the next `lowvram plan` and `launch` use the "
                     "--reserve-vram tune measured fastest")
    else:
        lines.append("tune changed nothing in the WebUI: webui-user, the hook and its config are as they were "
                     "before; the next `lowvram plan`, `apply` and `launch` use what tune measured")
    return lines


def chart(result: TuneResult, width: int = 40) -> str:
    """A bar per successful probe, grouped by road, longer = slower; the best is marked."""
    ok = [p for p in result.probes if p.ok and p.sit is not None]
    if not ok:
        return "(no successful probe to chart)"
    # Seconds per image where every probe has it (what tune compares on), else s/it.
    per_image = all(p.wall_s is not None for p in ok)

    def value(p: Probe) -> float:
        return (p.wall_s if per_image else p.sit) or 0.0

    worst = max(value(p) for p in ok) or 1.0
    lines = [("seconds per image" if per_image else "s/it") + " per road and reserve (shorter is faster; resident = "
             "the model kept in VRAM with that reserve, swap = parts of the model swapped to RAM)"]
    if any(p.swap_method for p in ok):
        lines[0] = ("seconds per image" if per_image else "s/it") + (" per Forge candidate: inference memory "
                                                                      "(GPU Weights = total − it), Swap Method/Location "
                                                                      "(shorter is faster)")
        for p in sorted(ok, key=lambda p: (p.reserve_mb, p.swap_method or "", p.swap_location or "")):
            bar = "█" * max(1, round(value(p) / worst * width))
            lines.append(f"{_forge_words(p):<22} {bar:<{width}} {value(p):.4f}{'  ◀ best' if p is result.best else ''}")
        return "\n".join(lines)
    if any(p.load_mode for p in ok):
        lines[0] = ("seconds per image" if per_image else "s/it") + " per ComfyUI candidate (shorter is faster)"
        for p in sorted(ok, key=lambda p: (p.load_mode, p.reserve_vram_mb or -1)):
            bar = "█" * max(1, round(value(p) / worst * max(4, width - 8)))
            label = f"{_comfy_words(p):<20}"
            lines.append(f"{label} {bar:<{width}} {value(p):.4f}{'  ◀ best' if p is result.best else ''}")
        return "\n".join(lines)
    for road in ("resident", "swap"):
        rows = sorted((p for p in ok if p.road == road), key=lambda p: p.reserve_mb)
        seen: set[int] = set()
        for p in rows:
            if p.reserve_mb in seen:
                continue
            seen.add(p.reserve_mb)
            sit = value(p)
            bar = "█" * max(1, round(sit / worst * width))
            label = f"{road:<8} {p.reserve_mb:>6}" if road == "resident" else f"{road:<8} {'-':>6}"
            mark = "  ◀ best" if p is result.best else ""
            lines.append(f"{label} {bar:<{width}} {sit:.4f}{mark}")
    return "\n".join(lines)


def _comfy_words(p: Probe) -> str:
    """A ComfyUI candidate as its flags: `--reserve-vram 0.8`, `default reserve`, plus the load mode."""
    words = "default reserve" if p.reserve_vram_mb is None else f"--reserve-vram {p.reserve_vram_mb / 1024:.1f}"
    return words + ("" if p.load_mode in ("", "default") else f" --{p.load_mode}")


def _forge_words(p: Probe) -> str:
    """A Forge candidate: its inference memory and Swap Method/Location."""
    return f"{p.reserve_mb} MiB {p.swap_method}/{p.swap_location}"


def _reserve_cell(p: Probe) -> str:
    if p.swap_method:
        return _forge_words(p)
    if p.load_mode:
        return _comfy_words(p)
    return str(p.reserve_mb) if p.road == "resident" else "-"
