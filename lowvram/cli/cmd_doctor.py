"""`lowvram doctor`: what is here, what is wrong, how to fix it. Parses, calls, renders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lowvram.cli.common import debug_enabled

if TYPE_CHECKING:
    from lowvram.world.diagnosis import DoctorReport

HELP = """Check the GPU, driver, RAM, TCMalloc and the WebUI, and say how to fix what is wrong.

Each check is ok, warn, fail or skip, with a hint. Exit code 1 when a check failed.

Examples:

  lowvram doctor

  lowvram doctor --webui ~/stable-diffusion-webui --json > facts.json
"""


def doctor(
    webui: Annotated[
        Path | None,
        typer.Option("--webui", metavar="PATH",
                     help="The WebUI tree (default: $LOWVRAM_WEBUI, the current directory, the last one used)."),
    ] = None,
    facts: Annotated[
        Path | None,
        typer.Option("--facts", metavar="FILE",
                     help="Use the JSON `lowvram doctor --json` printed instead of probing (or $LOWVRAM_FACTS)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema 1).")] = False,
) -> None:
    import os

    from lowvram.cli import render
    from lowvram.world.detect import gather_facts, resolve_webui
    from lowvram.world.diagnosis import build_report

    facts_file = facts or (Path(os.environ["LOWVRAM_FACTS"]) if os.environ.get("LOWVRAM_FACTS") else None)
    # The one lookup rule (as plan): with a facts file too, the WebUI found is read from disk; the
    # file's own WebUI stands only where none is found.
    tree = resolve_webui(webui)
    gathered = gather_facts(tree, facts_file)
    extra = []
    if tree is not None:
        from lowvram.world import paths
        from lowvram.world.apply.manifest import check_applied
        from lowvram.world.diagnosis import applied_conflicts, check_lowvram_applied

        applied = paths.manifest_path(tree).is_file()
        extra.append(check_lowvram_applied(check_applied(tree) if applied else None,
                                           applied_conflicts(tree, gathered) if applied else ()))
    report = build_report(gathered, extra)
    if as_json:
        render.emit_json(report.to_dict())
    else:
        sys.stdout.write(render_human(report, debug=debug_enabled()) + "\n")
    raise typer.Exit(report.exit_code)


def _summary_lines(report: DoctorReport) -> list[str]:
    from lowvram.world.diagnosis import chosen_gpu, mib_text

    f = report.facts
    s = f.system
    os_text = {"linux": "Linux", "windows": "Windows", "darwin": "macOS"}.get(s.os, s.os)
    version = s.os_version or ""
    # Linux's os_version is the distribution's name; Windows/macOS give a bare number.
    sys_line = version if s.os == "linux" and version else f"{os_text} {version}".rstrip()
    if s.wsl:
        sys_line += " (WSL)"
    if s.ram_mb is not None:
        sys_line += f", RAM {mib_text(s.ram_mb)}"
    if s.swap_mb is not None:
        sys_line += f", swap {mib_text(s.swap_mb)}"
    gpu = chosen_gpu(f)
    if gpu is not None:
        gpu_line = f"{gpu.name or 'NVIDIA GPU'}, {gpu.vram_total_mb if gpu.vram_total_mb is not None else '?'} MiB"
        if gpu.compute_capability:
            gpu_line += f", sm {gpu.compute_capability}"
        gen, width = gpu.pcie_gen_max or gpu.pcie_gen, gpu.pcie_width_max or gpu.pcie_width  # an idle link drops
        if gen and width:
            gpu_line += f", PCIe {gen} x{width}"
        if len(f.gpus) > 1:
            gpu_line += f" (of {len(f.gpus)} NVIDIA GPUs)"
    else:
        gpu_line = f"none ({f.nvml_error or 'no usable NVIDIA GPU'})"
    w = f.webui
    if w is None:
        webui_line = "none found"
    else:
        bits = [w.flavor, w.version or "version ?", w.path]
        if w.torch:
            bits.append(f"torch {w.torch}")
        if w.xformers:
            bits.append(f"xformers {w.xformers}")
        if w.model_family:
            bits.append(f"model {w.model_family}")
        webui_line = ", ".join(bits)
    return [f"System  {sys_line}", f"GPU     {gpu_line}", f"WebUI   {webui_line}"]


def render_human(report: DoctorReport, debug: bool = False) -> str:
    from lowvram.cli import render
    from lowvram.core.words import plural

    lines = [render.wrap(line, hang=8) for line in _summary_lines(report)]
    if debug:
        for g in report.facts.gpus:
            for err in g.errors:
                lines.append(render.style(render.wrap(f"        NVML GPU {g.index}: {err}", hang=10), "dim"))
    lines.append("")
    rows: list[tuple[render.Cell | str, str, render.Cell | str]] = []
    for c in report.checks:
        rows.append((render.Cell(c.status, c.status), c.id, c.message))
        if c.hint and c.status != "skip":
            rows.append(("", "", render.Cell("→ " + c.hint, "hint")))
    lines.append(render.table(("status", "check", "result"), rows, show_header=False, no_wrap=(0, 1)))
    counts = {s: sum(1 for c in report.checks if c.status == s) for s in ("fail", "warn", "ok", "skip")}
    lines.append("")
    summary = (f"{counts['fail']} failed, {plural(counts['warn'], 'warning')}, {counts['ok']} ok, "
               f"{counts['skip']} skipped")
    lines.append(render.style(summary, "fail" if counts["fail"] else ("warn" if counts["warn"] else "ok")))
    return "\n".join(lines)
