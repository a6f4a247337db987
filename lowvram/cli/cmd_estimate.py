"""`lowvram estimate`: the peak VRAM of one generation, where it goes, and whether it fits this GPU.

Reads (never writes) lowvram's state: the WebUI's observations and VRAM Estimator's stats.json
calibrate the model when a WebUI is found (docs/architecture.md#the-cli-contract, docs/architecture.md#the-policy).
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lowvram.cli.options import FactsOpt, JsonOpt, UiChoice, WebuiOpt, complete_profile_name
from lowvram.core.errors import UsageError
from lowvram.core.words import plural

if TYPE_CHECKING:
    from lowvram.core.estimate.calibration import Calibration
    from lowvram.core.estimate.memory import Estimate, EstimateRequest
    from lowvram.core.facts import Facts

SWEEP_SIDES = (512, 640, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048)
NATIVE_SIDE = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024}
MAX_STATS_BYTES = 16 * 1024 * 1024


class FamilyChoice(str, enum.Enum):
    sd15 = "sd15"
    sd2 = "sd2"
    sdxl = "sdxl"
    sdxl_refiner = "sdxl-refiner"


class PrecisionChoice(str, enum.Enum):
    half = "half"
    full = "full"


class AttentionChoice(str, enum.Enum):
    none = "none"
    split_attention = "split"  # not `split`: that would shadow str.split
    sub_quad = "sub-quad"
    xformers = "xformers"
    sdp = "sdp"


class EstOffloadChoice(str, enum.Enum):
    none = "none"
    medvram_sdxl = "medvram-sdxl"
    medvram = "medvram"
    lowvram = "lowvram"


@dataclass
class EstimateResult:
    """Everything the command shows; `to_json()` is the `--json` contract (docs/architecture.md#the-cli-contract)."""

    request: EstimateRequest
    estimate: Estimate
    vram_mb: int | None
    headroom_mb: int | None
    margin: float
    fits: bool | None
    max_square_px: int | None
    calibration: Calibration
    gpu: str | None = None
    vram_source: str = "unknown"
    notes: list[str] = field(default_factory=list)
    sweep: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.request
        out: dict[str, Any] = {
            "schema": 1,
            "peak_mb": self.estimate.peak_mb,
            "torch_peak_mb": self.estimate.torch_peak_mb,
            "parts": dict(self.estimate.parts),
            "fits": self.fits,
            "vram_mb": self.vram_mb,
            "headroom_mb": self.headroom_mb,
            "max_square_px": self.max_square_px,
            "margin": round(self.margin, 3),
            "phase": self.estimate.phase,
            "phases": dict(self.estimate.phases),
            "request": {
                "model": r.family,
                "width": r.width,
                "height": r.height,
                "batch": r.batch,
                "precision": r.precision,
                "vae_precision": r.vae_precision,
                "attention": r.attention,
                "offload": r.offload,
                "hires_scale": r.hires_scale,
                "ui": r.ui,
                "batch_cond_uncond": r.batch_cond_uncond,
                "tiled_vae": r.tiled_vae,
            },
            "gpu": self.gpu,
            "vram_source": self.vram_source,
            "calibration": self.calibration.summary(),
            "notes": list(self.notes),
        }
        if self.sweep is not None:
            out["sweep"] = self.sweep
        return out


# --------------------------------------------------------------------------- inputs


def _profile_values(name: str) -> dict[str, Any]:
    from lowvram.world.profile_files import load_profile

    prof = load_profile(name).profile
    values: dict[str, Any] = {}
    target = prof.target
    if target.width:
        values["width"] = target.width
    if target.height:
        values["height"] = target.height
    values["batch"] = target.batch
    values["hires_scale"] = target.hires_scale
    values["precision"] = "full" if prof.precision.unet == "full" else "half"
    values["vae_precision"] = "full" if prof.precision.vae == "full" else "half"
    attention = {"sdp-no-mem": "sdp", "auto": None}.get(prof.attention, prof.attention)
    if attention:
        values["attention"] = attention
    if prof.offload in ("none", "medvram-sdxl", "medvram", "lowvram"):
        values["offload"] = prof.offload
    elif prof.offload in ("novram", "cpu"):
        values["offload"] = "lowvram"
    values["name"] = name
    values["models"] = tuple(prof.match.model)  # the families it is made for: the first is implied
    return values


def _read_observations(webui: Path) -> tuple[list[Any], list[str]]:
    from lowvram.world import paths
    from lowvram.world.observation_log import load_observations

    loaded = load_observations(paths.observations_path(webui))
    return list(loaded.items), list(loaded.warnings)


def _find_stats(webui: Path) -> list[Path]:
    ext = webui / "extensions"
    try:
        found = sorted(ext.glob("*/stats.json"))
    except OSError:
        return []
    # VRAM Estimator's clone dir is normally a1111-stable-diffusion-webui-vram-estimator.
    return [p for p in found if "vram" in p.parent.name.lower() and "estimator" in p.parent.name.lower()] or [
        p for p in found if "vram" in p.parent.name.lower()
    ]


def _calibration_for(webui: Path | None, template: EstimateRequest, notes: list[str]) -> Calibration:
    from lowvram.core.estimate.calibration import DEFAULT_CALIBRATION, StatsData, calibrate, parse_stats

    if webui is None:
        return DEFAULT_CALIBRATION
    observations, warnings = _read_observations(webui)
    notes.extend(warnings)
    stats: StatsData | None = None
    for path in _find_stats(webui):
        try:
            if path.stat().st_size > MAX_STATS_BYTES:
                notes.append(f"{path}: too large to be VRAM Estimator's stats.json; ignored")
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            notes.append(f"cannot read {path}: {exc.strerror}")
            continue
        parsed = parse_stats(text)
        if parsed.skipped:
            notes.append(f"{path}: skipped {plural(len(parsed.skipped), 'part')}: {'; '.join(parsed.skipped[:3])} (the rest "
                         "is used; VRAM Estimator's benchmark rewrites the file)")
        if parsed.records:
            stats = parsed
            break
    if not observations and stats is None:
        return DEFAULT_CALIBRATION
    return calibrate(template, observations, stats)


def _note_damaged_inputs(wf: Any, family: str, notes: list[str]) -> None:
    """Damaged optional inputs the WebUI probe read past (detect/webui.py): notes."""
    if wf is not None and wf.config_error:
        notes.append(f"{wf.config_error} (fix it, or move it away)")
    if wf is not None and wf.checkpoint_error:
        notes.append(f"{wf.checkpoint_error} (estimated as --model {family}; re-download it or select another)")


def _vram_from_facts(facts: Facts, notes: list[str]) -> tuple[int | None, int | None, str | None]:
    """(VRAM total, measured use by others, GPU name) of the GPU the UI would run on."""
    from lowvram.core.policy import webui_gpu

    # The UI's own device flag (--device-id …) in the user's COMMANDLINE_ARGS picks the card, as for plan.
    choice = webui_gpu(facts)
    gpu = choice.gpu
    if gpu is None:
        notes.append(choice.reason)
    if gpu is None or not gpu.vram_total_mb:
        return None, None, None
    used = None
    if gpu.vram_free_mb is not None:
        used = max(0, gpu.vram_total_mb - gpu.vram_free_mb)
    return gpu.vram_total_mb, used, gpu.name


@dataclass(frozen=True)
class _Machine:
    """What was found about the machine: the WebUI tree, the facts, and the WebUI's own facts (each may be None)."""

    webui: Path | None
    facts: Facts | None
    webui_facts: Any
    from_file: bool


@dataclass(frozen=True)
class _Budget:
    """The VRAM to fit into: total, what others hold (headroom), the GPU's name, and where the size came from."""

    total: int | None
    headroom: int | None
    gpu: str | None
    source: str


def _probe_machine(webui_arg: Path | None, facts_file: Path | None, vram_mb: int | None,
                   notes: list[str], ui: str | None = None) -> _Machine:
    """Find the WebUI (the one rule, as plan); probe the facts unless --vram-mb makes them unneeded (a
    facts file is always read). A --ui that contradicts the WebUI found is a usage error, as for plan."""
    import os

    from lowvram.world.detect import gather_facts, locate_webui, probe_webui
    from lowvram.world.plan_inputs import check_ui_matches

    located = locate_webui(webui_arg)
    webui = located[0] if located else None
    facts: Facts | None = None
    wf_obj = None
    from_file = facts_file is not None or bool(os.environ.get("LOWVRAM_FACTS"))
    if vram_mb is None or from_file:
        facts = gather_facts(webui, facts_file)
        wf_obj = facts.webui
    elif webui is not None:
        wf_obj = probe_webui(webui)
    check_ui_matches(ui, wf_obj, located[1] if located else None)
    if webui is not None and wf_obj is not None:
        notes.append(f"WebUI at {webui} ({wf_obj.flavor})")
    return _Machine(webui, facts, wf_obj, from_file)


def _resolve_family(model: str | None, prof: dict[str, Any], wf_obj: Any, ui: str | None, notes: list[str]) -> str:
    """The model family by plan's rule (core/policy/family.py), what-if first: --model, then the
    profile's, then the WebUI's selected checkpoint, then what a fresh A1111 loads; else one error
    (exit 1, as plan) saying which choice settles it."""
    from lowvram.core.policy.family import choose_family, family_or_error

    choice = choose_family(wf_obj, model=model, profile=prof.get("name"), profile_models=prof.get("models", ()),
                           ui=ui, cli_first=True)
    family = family_or_error(choice, wf_obj, ui)
    if choice.source != "cli":
        notes.append(f"model family {family}: {choice.reason}")
    _note_damaged_inputs(wf_obj, family, notes)
    return family


def _build_request(
    family: str,
    prof: dict[str, Any],
    wf_obj: Any,
    *,
    width: int | None,
    height: int | None,
    batch: int | None,
    precision: str | None,
    vae_precision: str | None,
    tiled_vae: bool,
    ui: str | None,
    attention: str | None,
    offload: str | None,
    hires_scale: float | None,
) -> EstimateRequest:
    """The validated request: each field from the CLI, then the profile, then the WebUI, then the default."""
    from lowvram.core.estimate import memory as est

    ui_key = ui or (wf_obj.flavor if wf_obj is not None and wf_obj.flavor in est.UIS else None) or "a1111"
    side = NATIVE_SIDE.get(family, 512)
    bcu = wf_obj.batch_cond_uncond if wf_obj is not None and wf_obj.batch_cond_uncond is not None else True
    req = est.EstimateRequest(
        family=family,
        width=width or prof.get("width") or side,
        height=height or prof.get("height") or prof.get("width") or side,
        batch=batch or prof.get("batch") or 1,
        precision=precision or prof.get("precision", "half"),
        vae_precision=vae_precision or prof.get("vae_precision") or precision or "half",
        attention=attention or prof.get("attention", "sdp"),
        offload=offload or prof.get("offload", "none"),
        hires_scale=hires_scale if hires_scale is not None else float(prof.get("hires_scale", 1.0)),
        ui=ui_key,
        batch_cond_uncond=bcu,
        tiled_vae=tiled_vae,
    )
    est.validate(req)
    return req


def _vram_budget(vram_mb: int | None, machine: _Machine, notes: list[str]) -> _Budget:
    """--vram-mb, else the UI's GPU from the facts; the headroom is the OS floor or what others use, if more."""
    facts = machine.facts
    total: int | None = vram_mb
    used: int | None = None
    gpu_name: str | None = None
    vram_source = "--vram-mb" if vram_mb is not None else "unknown"
    if total is None and facts is not None:
        total, used, gpu_name = _vram_from_facts(facts, notes)
        if total is not None:
            vram_source = "facts file" if machine.from_file else "NVML"
    if total is not None and total <= 0:
        raise UsageError(f"VRAM size {total} MiB is not a size", "give --vram-mb as a positive number of MiB")
    os_name = facts.system.os if facts is not None else ("windows" if sys.platform == "win32" else "linux")
    headroom: int | None = None
    if total is not None:
        from lowvram.core.policy import headroom_floor

        headroom = max(headroom_floor(os_name, bool(facts is not None and facts.system.wsl)), used or 0)
    return _Budget(total, headroom, gpu_name, vram_source)


def _fit(req: EstimateRequest, peak_mb: int, budget: _Budget, calibration: Calibration,
         notes: list[str]) -> tuple[bool | None, int | None]:
    """(Does it fit, the largest square that does); both None when the VRAM size is unknown."""
    from lowvram.core.estimate import memory as est

    if budget.total is None or budget.headroom is None:
        notes.append("no VRAM size known (no NVIDIA GPU found, no --vram-mb): fits is unknown")
        return None, None
    margin = calibration.error
    fits = est.fits(peak_mb, budget.total, budget.headroom, margin)
    return fits, est.max_square_px(req, budget.total, budget.headroom, margin, calibration)


def _sweep_rows(req: EstimateRequest, calibration: Calibration, budget: _Budget) -> list[dict[str, Any]]:
    """The --sweep table: each square size under each offload mode of the family."""
    from lowvram.core.estimate import memory as est

    total, headroom, margin = budget.total, budget.headroom, calibration.error
    rows: list[dict[str, Any]] = []
    for mode in _sweep_modes(req.family):
        for s in SWEEP_SIDES:
            e = est.estimate(replace(req, width=s, height=s, offload=mode), calibration)
            ok = None if total is None or headroom is None else est.fits(e.peak_mb, total, headroom, margin)
            rows.append({"width": s, "height": s, "offload": mode, "peak_mb": e.peak_mb, "fits": ok})
    return rows


def run_estimate(
    *,
    model: str | None,
    width: int | None,
    height: int | None,
    batch: int | None,
    precision: str | None,
    vae_precision: str | None,
    tiled_vae: bool,
    ui: str | None,
    attention: str | None,
    offload: str | None,
    hires_scale: float | None,
    profile: str | None,
    vram_mb: int | None,
    facts_file: Path | None,
    webui_arg: Path | None,
    sweep: bool,
) -> EstimateResult:
    """Resolve the inputs (CLI > profile > WebUI facts > defaults), estimate, and test the fit."""
    from lowvram.core.estimate import memory as est

    notes: list[str] = []
    prof = _profile_values(profile) if profile else {}
    machine = _probe_machine(webui_arg, facts_file, vram_mb, notes, ui)
    family = _resolve_family(model, prof, machine.webui_facts, ui, notes)
    req = _build_request(
        family, prof, machine.webui_facts, width=width, height=height, batch=batch, precision=precision,
        vae_precision=vae_precision, tiled_vae=tiled_vae, ui=ui, attention=attention, offload=offload,
        hires_scale=hires_scale,
    )
    calibration = _calibration_for(machine.webui, req, notes)
    budget = _vram_budget(vram_mb, machine, notes)
    result = est.estimate(req, calibration)
    fits, max_side = _fit(req, result.peak_mb, budget, calibration, notes)
    sweep_rows = _sweep_rows(req, calibration, budget) if sweep else None
    return EstimateResult(req, result, budget.total, budget.headroom, calibration.error, fits, max_side, calibration,
                          budget.gpu, budget.source, notes, sweep_rows)


def _sweep_modes(family: str) -> tuple[str, ...]:
    if family in ("sdxl", "sdxl-refiner"):
        return ("none", "medvram-sdxl", "lowvram")
    return ("none", "medvram", "lowvram")


# --------------------------------------------------------------------------- output


def _gib(mb: int) -> str:
    return f"{mb / 1024:.1f}"


def render_text(res: EstimateResult) -> str:
    from lowvram.cli import render

    r, e = res.request, res.estimate
    prec = "fp16" if r.precision == "half" else "fp32"
    vae = "fp16" if r.vae_precision == "half" else "fp32"
    head = (f"{r.family} {r.width}x{r.height}, batch {r.batch}"
            + (f", hires x{r.hires_scale:g}" if r.hires_scale > 1 else "")
            + f", {prec} (VAE {vae}{', tiled' if r.tiled_vae else ''}), {r.attention} attention, offload {r.offload}, {r.ui}")
    lines = [render.style(render.wrap(head), "bold")]
    lines.append(render.wrap(f"peak {e.peak_mb} MiB ({_gib(e.peak_mb)} GiB) during {e.phase.replace('_', ' ')};"
                             f" torch peak {e.torch_peak_mb} MiB"))
    lines.append(_parts_table(e.parts))
    cal = res.calibration
    if cal.points:
        lines.append(render.wrap(f"calibrated on {plural(cal.points, 'point')} ({cal.source}): median error "
                                 f"{(cal.median_error or 0) * 100:.0f} %, max {(cal.max_error or 0) * 100:.0f} %"))
    if res.fits is None:
        lines.append(render.style(render.wrap("fits: unknown (no VRAM size; give --vram-mb)"), "skip"))
    else:
        assert res.vram_mb is not None and res.headroom_mb is not None
        need = round(e.peak_mb * (1 + res.margin)) + res.headroom_mb
        verdict = "fits" if res.fits else "does not fit"
        where = f" ({res.gpu})" if res.gpu else ""
        lines.append(render.lead(verdict, f"in {res.vram_mb} MiB{where}: needs {need} MiB with {res.headroom_mb} MiB "
                                 f"kept free and a {res.margin * 100:.0f} % margin", "ok" if res.fits else "fail"))
        if res.max_square_px is None:
            more = "" if res.request.offload == "lowvram" else "; try more offload, e.g. --offload lowvram"
            lines.append(render.wrap(f"largest square that fits: none (not even 64 px{more})"))
        else:
            lines.append(f"largest square that fits: {res.max_square_px} px")
    if res.sweep is not None:
        lines.append("")
        lines.append(render_sweep(res))
    return "\n".join(lines)


def _parts_table(parts: dict[str, int]) -> str:
    """Where the peak goes: one row per part, a bar as long as its share (as wide as the screen allows)."""
    from lowvram.cli import render

    shown = {name: mb for name, mb in parts.items() if mb > 0}
    width = max(4, min(30, render.screen_width() - 2 - max((len(n) for n in shown), default=0) - 14))
    biggest = max(*parts.values(), 1)
    rows = [(name, f"{mb} MiB", render.Cell("█" * max(1, round(width * mb / biggest)), "dim"))
            for name, mb in shown.items()]
    return render.table(("part", "MiB", "share"), rows, show_header=False, no_wrap=(0, 1, 2), right=(1,), indent=2)


def render_sweep(res: EstimateResult) -> str:
    from lowvram.cli import render

    assert res.sweep is not None
    modes = list(dict.fromkeys(row["offload"] for row in res.sweep))
    sides = list(dict.fromkeys(row["width"] for row in res.sweep))
    cell = {(row["width"], row["offload"]): row for row in res.sweep}
    rows: list[list[str | render.Cell]] = []
    for s in sides:
        row: list[str | render.Cell] = [f"{s}²"]
        for m in modes:
            fits = cell[(s, m)]["fits"]
            mark = {True: "ok", False: "no", None: ""}[fits]
            row.append(render.Cell(f"{_gib(cell[(s, m)]['peak_mb'])} GiB {mark}".strip(),
                                   {True: "ok", False: "fail", None: None}[fits]))
        rows.append(row)
    out = [render.table(["size", *modes], rows, no_wrap=range(len(modes) + 1))]
    if res.vram_mb is not None:
        out.append(render.style(render.wrap(f"ok = fits in {res.vram_mb} MiB with {res.headroom_mb} MiB kept free "
                                            f"and a {res.margin * 100:.0f} % margin"), "dim"))
    return "\n".join(out)


def estimate_command(  # noqa: PLR0917 - typer maps each option to a parameter
    model: Annotated[FamilyChoice | None, typer.Option("--model", help="Model family.")] = None,
    width: Annotated[int | None, typer.Option("--width", min=8, max=16384, metavar="PX", help="Image width (px).")] = None,
    height: Annotated[int | None, typer.Option("--height", min=8, max=16384, metavar="PX", help="Image height (px).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, max=256, metavar="N", help="Batch size.")] = None,
    precision: Annotated[PrecisionChoice | None, typer.Option("--precision", help="UNet/text encoder precision.")] = None,
    vae_precision: Annotated[
        PrecisionChoice | None, typer.Option("--vae-precision", help="VAE precision (full where --no-half-vae).")
    ] = None,
    tiled_vae: Annotated[bool, typer.Option("--tiled-vae", help="Decode the VAE in tiles (Tiled VAE extension).")] = False,
    ui: Annotated[UiChoice | None, typer.Option("--ui", help="The UI that runs it (default: the WebUI found, else a1111).")] = None,
    attention: Annotated[AttentionChoice | None, typer.Option("--attention", help="Cross-attention backend (default sdp).")] = None,
    offload: Annotated[EstOffloadChoice | None, typer.Option("--offload", help="Offload level: how much of the model moves to RAM (default none).")] = None,
    hires_scale: Annotated[
        float | None, typer.Option("--hires-scale", min=1.0, max=8.0, metavar="X",
                                    help="Hires fix upscale factor (1 = off).")
    ] = None,
    profile: Annotated[str | None, typer.Option("--profile", "-p", metavar="NAME",
                                                autocompletion=complete_profile_name,
                                                help="Take size, precision, attention and offload from a profile.")] = None,
    vram_mb: Annotated[int | None, typer.Option("--vram-mb", min=1, metavar="MIB", help="VRAM size to test against (MiB).")] = None,
    facts: FactsOpt = None,
    webui: WebuiOpt = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="A table of sizes × offload modes: what fits.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Estimate peak VRAM of one generation, its parts, and whether it fits this GPU.

    \b
    Example:
      lowvram estimate --model sdxl --width 1024 --height 1024 --vram-mb 8192
    """
    from lowvram.cli import render

    def val(choice: enum.Enum | None) -> str | None:
        return None if choice is None else str(choice.value)

    res = run_estimate(
        model=val(model), width=width, height=height, batch=batch, precision=val(precision),
        vae_precision=val(vae_precision), tiled_vae=tiled_vae, ui=val(ui), attention=val(attention),
        offload=val(offload), hires_scale=hires_scale, profile=profile, vram_mb=vram_mb,
        facts_file=facts, webui_arg=webui, sweep=sweep,
    )
    if json_out:
        render.emit_json(res.to_json())
        return
    print(render_text(res))
    for note in res.notes:
        render.note(note)
