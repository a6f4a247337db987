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

from lowvram.cli.options import (
    MODEL_HELP,
    FactsOpt,
    JsonOpt,
    UiChoice,
    WebuiOpt,
    complete_model,
    complete_profile_name,
)
from lowvram.core.errors import UsageError
from lowvram.core.estimate.dit import DIT_FAMILIES
from lowvram.core.words import plural
from lowvram.ui import lineage_key

if TYPE_CHECKING:
    from lowvram.core.estimate.calibration import Calibration
    from lowvram.core.estimate.format_choice import CardSpeed, FormatRow, Recommendation
    from lowvram.core.estimate.memory import Estimate, EstimateRequest
    from lowvram.core.facts import Facts, GpuFacts

SWEEP_SIDES = (512, 640, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048)
# The diffusion transformers (Flux.1, SD3, SD3.5) are all trained at 1024².
NATIVE_SIDE = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024} | dict.fromkeys(DIT_FAMILIES, 1024)
# doctor's model_format words that the estimator's format table names otherwise (core/model_files.py).
FORMAT_ALIASES = {"fp8_e4m3": "fp8_e4m3fn", "f16": "fp16", "f32": "fp32"}
# formats.DEQUANT_WHY in one line.
DEQUANT_NOTE = ("relative s/it counts turning fp8, NF4 and GGUF weights back into 16 bit every step (measured "
                "on an L40: NF4 +4 %, fp8 +11 %; GGUF assumed +15 to +30 %), and streaming as not overlapping "
                "the compute")
MAX_STATS_BYTES = 16 * 1024 * 1024


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
    formats: FormatsResult | None = None

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
                "weight_format": _weight_format_name(r),
                "text_format": _text_format_name(r),
            },
            "gpu": self.gpu,
            "vram_source": self.vram_source,
            "calibration": self.calibration.summary(),
            "notes": list(self.notes),
        }
        if self.sweep is not None:
            out["sweep"] = self.sweep
        if self.formats is not None:
            out.update(self.formats.to_json())
        return out


@dataclass(frozen=True)
class FormatsResult:
    """`--formats`: each weight format of the model on this card (core/estimate/format_choice.py)."""

    rows: list[FormatRow]
    recommended: Recommendation | None
    current: str | None  # the detected file's format, marked in the table
    vram_known: bool

    def to_json(self) -> dict[str, Any]:
        rows = [{"format": r.format, "weights_mb": r.weights_mb, "peak_mb": r.peak_mb, "fits": r.fits,
                 "offloaded_mb": r.offloaded_mb, "relative_sit": None if r.why_not else r.relative_sit,
                 "why_not": r.why_not, **({"current": True} if r.format == self.current else {})}
                for r in self.rows]
        rec = self.recommended
        return {"formats": rows, "recommended": None if rec is None else {"format": rec.format, "reason": rec.reason}}


def _weight_format_name(r: EstimateRequest) -> str:
    from lowvram.core.estimate import memory as est

    return est.model_format(r).name


def _text_format_name(r: EstimateRequest) -> str | None:
    """T5-XXL's format for a DiT (None where the UI leaves it unloaded); None for the SD families (no T5)."""
    from lowvram.core.estimate import memory as est

    if r.family not in DIT_FAMILIES:
        return None
    t5 = est.t5_format(r)
    return None if t5 is None else t5.name


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


def _other_ui_runs(machine: _Machine, notes: list[str]) -> list[Any]:
    """Runs of this tree's model file on this GPU recorded for other WebUI trees (world/plan_inputs.py)."""
    from lowvram.world.plan_inputs import other_ui_runs

    if machine.facts is None:
        return []
    trees, warnings = other_ui_runs(machine.facts, machine.webui, _gpu_for(machine.facts))
    notes.extend(warnings)
    if trees:
        notes.append("evidence: " + "; ".join(t.describe() for t in trees)
                     + " (their peaks calibrate this estimate and their OOMs bound it; each UI's own settings stay with it)")
    return [o for t in trees for o in t.runs]


def _with_other_ooms(req: EstimateRequest, result: Any, runs: list[Any], budget: _Budget, notes: list[str]) -> Any:
    """Another UI's run of this model on this card that ran out of memory needed more than its card held:
    the estimate is raised to what that says (calibration.measured_scale, OOMs only: peaks calibrate)."""
    from lowvram.core.estimate.calibration import measured_scale
    from lowvram.core.observations import oom_run

    ooms = [o for o in runs if oom_run(o)]
    if not ooms or budget.total is None or budget.headroom is None:
        return result
    scaled = measured_scale(req, ooms, usable_mb=budget.total - budget.headroom, room_mb=budget.headroom)
    if scaled.scale <= 1.0:
        return result
    more = round(result.peak_mb * (scaled.scale - 1.0))
    notes.append(f"{plural(scaled.ooms, 'run')} of this model on this GPU in another UI ran out of memory where the "
                 f"estimate said it fits: peak raised by {more} MiB (×{scaled.scale:.2f})")
    return replace(result, peak_mb=result.peak_mb + more, parts={**result.parts, "measured_in_other_uis": more})


def _calibration_for(webui: Path | None, template: EstimateRequest, notes: list[str],
                     other: list[Any] | None = None) -> Calibration:
    from lowvram.core.estimate.calibration import DEFAULT_CALIBRATION, StatsData, calibrate, parse_stats

    if webui is None:
        return DEFAULT_CALIBRATION
    observations, warnings = _read_observations(webui)
    notes.extend(warnings)
    observations += other or []
    if template.family in DIT_FAMILIES:
        if observations or _find_stats(webui):
            notes.append(f"calibration: this WebUI's measurements are of SD models, which {template.family} "
                         "does not share: estimated with lowvram's reference calibration")
        return DEFAULT_CALIBRATION
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


def _model_file(model: str | None, machine: _Machine,
                notes: list[str]) -> tuple[str | None, _Machine, str | None]:
    """--model FILE: the file's family, with the file as the WebUI's checkpoint (world/plan_inputs.py); and
    where no WebUI was found, the file's stored format as its header said (read once, there)."""
    from lowvram.world.plan_inputs import resolve_model_arg

    arg = resolve_model_arg(model, machine.webui_facts)
    if arg.choice is not None:
        notes.append(f"model family {arg.family}: {arg.choice.reason}")
    return arg.family, replace(machine, webui_facts=arg.webui), arg.file.format if arg.file is not None else None


def _resolve_family(model: str | None, prof: dict[str, Any], wf_obj: Any, ui: str | None, notes: list[str]) -> str:
    """The model family by plan's rule (core/policy/family.py), what-if first: --model, then the
    profile's, then the WebUI's selected checkpoint, then what a fresh A1111 loads; else one error
    (exit 1, as plan) saying which choice settles it."""
    from lowvram.core.estimate.memory import FAMILIES
    from lowvram.core.policy.family import choose_family, family_or_error

    choice = choose_family(wf_obj, model=model, profile=prof.get("name"), profile_models=prof.get("models", ()),
                           ui=ui, cli_first=True)
    # estimate models every family the estimator knows (the DiTs too), whatever plan supports yet
    family = choice.family if choice.family in FAMILIES else family_or_error(choice, wf_obj, ui)
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

    ui_key = lineage_key(ui or (wf_obj.flavor if wf_obj is not None and lineage_key(wf_obj.flavor) in est.UIS else None)
                         or _default_ui(family))  # Forge Neo and reForge are estimated as Forge
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


def _default_ui(family: str) -> str:
    """The UI a request is estimated for where neither --ui nor a WebUI says: A1111, or Forge for a DiT
    (A1111 runs no Flux or SD3.5; Forge loads every format)."""
    return "forge" if family in DIT_FAMILIES else "a1111"


def _format_name(value: str, option: str) -> str:
    """A format as the user (or doctor's model_format) spells it, in the estimator's words; one usage error else."""
    from lowvram.core.estimate.formats import FORMATS

    name = value.strip().lower()
    name = FORMAT_ALIASES.get(name, name)
    if name not in FORMATS:
        raise UsageError(f"{option} {value}: not a weight format lowvram knows",
                         f"use one of: {', '.join(FORMATS)}")
    return name


def _file_format(lone_file_format: str | None, family: str, machine: _Machine) -> str | None:
    """The stored format of the model file the family came from: --model FILE's where no WebUI was found
    (`lone_file_format`, from _model_file), else the WebUI's checkpoint where it is of the family estimated;
    None where no file says."""
    wf = machine.webui_facts
    if lone_file_format is not None and wf is None:
        return lone_file_format
    if wf is not None and wf.model_family == family and wf.model_format:
        return str(wf.model_format)
    return None


def _with_formats(req: EstimateRequest, weight_format: str | None, text_format: str | None,
                  file_format: str | None, notes: list[str]) -> EstimateRequest:
    """--weight-format/--text-format, else for a DiT the file's own format where the UI keeps it as stored
    (fp8, NF4, GGUF: a 16/32-bit file is computed at the precision's dtype), else the precision's."""
    from lowvram.core.estimate import memory as est
    from lowvram.core.estimate.formats import FORMATS

    wf = _format_name(weight_format, "--weight-format") if weight_format else ""
    tf = _format_name(text_format, "--text-format") if text_format else ""
    if tf and req.family not in DIT_FAMILIES:
        raise UsageError(f"--text-format {text_format}: {req.family} has no T5 text encoder",
                         "--text-format sets T5-XXL's format for Flux.1 and SD3/SD3.5 models; drop it")
    if not wf and file_format and req.family in DIT_FAMILIES:
        name = FORMAT_ALIASES.get(file_format, file_format)
        if name not in FORMATS:
            notes.append(f"the model file's format {file_format} is not one lowvram models: estimated as "
                         f"{est.model_format(req).name} (--weight-format gives another)")
        elif FORMATS[name].kind != "float":
            wf = name
    out = replace(req, weight_format=wf, text_format=tf)
    est.validate(out)
    return out


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


def _gpu_for(facts: Facts | None) -> GpuFacts | None:
    from lowvram.core.policy import webui_gpu

    return webui_gpu(facts).gpu if facts is not None else None


def _card_speed(gpu: GpuFacts | None) -> tuple[CardSpeed, int | None, int | None]:
    """The card's compute and PCIe rates (format_choice.card_speed), and the PCIe link (its maximum, which an
    idle card does not show as its current link; else the current one)."""
    from lowvram.core.estimate.format_choice import card_speed

    if gpu is None:
        return card_speed(cc=None, name=None, cores=None, clock_mhz=None, pcie_gen=None, pcie_width=None), 3, 16
    cc: tuple[int, int] | None = None
    if gpu.compute_capability:
        major, _, minor = gpu.compute_capability.partition(".")
        if major.isdigit() and minor.isdigit():
            cc = (int(major), int(minor))
    gen = gpu.pcie_gen_max or gpu.pcie_gen
    width = gpu.pcie_width_max or gpu.pcie_width
    speed = card_speed(cc=cc, name=gpu.name, cores=gpu.cuda_cores, clock_mhz=gpu.sm_clock_max_mhz,
                       pcie_gen=gen, pcie_width=width)
    return (speed, gen, width) if gen and width else (speed, 3, 16)  # card_speed's assumption, noted


def _compare_formats(req: EstimateRequest, calibration: Calibration, budget: _Budget, machine: _Machine, *,
                     current: str | None, notes: list[str]) -> FormatsResult:
    """--formats: every compared format (and the file's own, where it is not among them) on this card."""
    from lowvram.core.estimate import format_choice as fc
    from lowvram.core.estimate.formats import COMPARED, FORMATS

    current = FORMAT_ALIASES.get(current, current) if current else None
    current = current if current in FORMATS else None
    shown = (*COMPARED, current) if current and current not in COMPARED else COMPARED
    speed, gen, width = _card_speed(_gpu_for(machine.facts))
    usable = budget.total - budget.headroom if budget.total is not None and budget.headroom is not None else None
    ram = machine.facts.system.ram_mb if machine.facts is not None else None
    rows = fc.compare_formats(req, speed, usable_mb=usable, margin=calibration.error, formats=shown,
                              calibration=calibration, ram_mb=ram)
    rec = fc.recommend(rows, budget.total, pcie_gen=gen, pcie_width=width, speed=speed)
    if usable is None:
        notes.append("formats: no VRAM size known, so whether each fits and how fast it runs are unknown; "
                     "give --vram-mb")
    else:
        notes.extend(f"formats: {words}" for words in speed.assumed)
        notes.append(DEQUANT_NOTE)
    return FormatsResult(rows, rec, current, usable is not None)


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
    weight_format: str | None = None,
    text_format: str | None = None,
    formats: bool = False,
) -> EstimateResult:
    """Resolve the inputs (CLI > profile > WebUI facts > defaults), estimate, and test the fit."""
    from lowvram.core.estimate import memory as est

    notes: list[str] = []
    # usage errors first, before anything is probed
    weight_format = _format_name(weight_format, "--weight-format") if weight_format else None
    text_format = _format_name(text_format, "--text-format") if text_format else None
    prof = _profile_values(profile) if profile else {}
    machine = _probe_machine(webui_arg, facts_file, vram_mb, notes, ui)
    model, machine, lone_file_format = _model_file(model, machine, notes)
    family = _resolve_family(model, prof, machine.webui_facts, ui, notes)
    if formats:
        from lowvram.core.estimate.format_choice import require_dit

        require_dit(family)
    req = _build_request(
        family, prof, machine.webui_facts, width=width, height=height, batch=batch, precision=precision,
        vae_precision=vae_precision, tiled_vae=tiled_vae, ui=ui, attention=attention, offload=offload,
        hires_scale=hires_scale,
    )
    file_format = _file_format(lone_file_format, family, machine)
    req = _with_formats(req, weight_format, text_format, file_format, notes)
    other_runs = _other_ui_runs(machine, notes)
    calibration = _calibration_for(machine.webui, req, notes, other_runs)
    budget = _vram_budget(vram_mb, machine, notes)
    result = _with_other_ooms(req, est.estimate(req, calibration), other_runs, budget, notes)
    fits, max_side = _fit(req, result.peak_mb, budget, calibration, notes)
    _note_dit_ui(req, ui, machine, fits, notes, formats=formats)
    sweep_rows = _sweep_rows(req, calibration, budget) if sweep else None
    table = _compare_formats(req, calibration, budget, machine, current=file_format, notes=notes) if formats else None
    return EstimateResult(req, result, budget.total, budget.headroom, calibration.error, fits, max_side, calibration,
                          budget.gpu, budget.source, notes, sweep_rows, table)


def _note_dit_ui(req: EstimateRequest, ui: str | None, machine: _Machine, fits: bool | None, notes: list[str], *,
                 formats: bool) -> None:
    """What the UI does with a DiT that the numbers do not show."""
    from lowvram.core.estimate import memory as est
    from lowvram.core.estimate.formats import ui_loads

    if req.family not in DIT_FAMILIES:
        return
    wf = machine.webui_facts
    if ui is None and (wf is None or wf.flavor not in est.UIS):
        notes.append(f"UI: estimated for Forge, which runs {req.family} in every format (--ui picks another)")
    why = ui_loads(req.ui, est.model_format(req), req.family)
    if why:
        notes.append(f"{why}: this estimate is for a model the UI will not load")
    elif fits is False and req.ui != "a1111" and req.offload == "none":
        more = "" if formats else ": `lowvram estimate --formats` shows what that costs and which format fits whole"
        notes.append(f"{_ui_title(req.ui)} does not stop here: it loads what fits and streams the rest of the "
                     f"model from RAM every step{more}")


def _ui_title(ui: str) -> str:
    from lowvram.ui import adapter

    return adapter(ui).title


def _sweep_modes(family: str) -> tuple[str, ...]:
    if family in DIT_FAMILIES:  # A1111's medvram levels do not exist for them: whole, or block by block
        return ("none", "lowvram")
    if family in ("sdxl", "sdxl-refiner"):
        return ("none", "medvram-sdxl", "lowvram")
    return ("none", "medvram", "lowvram")


# --------------------------------------------------------------------------- output


def _gib(mb: int) -> str:
    return f"{mb / 1024:.1f}"


def render_text(res: EstimateResult) -> str:
    from lowvram.cli import render

    r, e = res.request, res.estimate
    lines = [render.style(render.wrap(_heading(r)), "bold")]
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
        streams = r.family in DIT_FAMILIES and r.ui != "a1111" and r.offload == "none"
        if res.max_square_px is None and streams:
            lines.append(render.wrap("largest square that fits whole: none (the UI streams the model instead: "
                                     "see the note below)"))
        elif res.max_square_px is None:
            more = "" if res.request.offload == "lowvram" else "; try more offload, e.g. --offload lowvram"
            lines.append(render.wrap(f"largest square that fits: none (not even 64 px{more})"))
        else:
            lines.append(f"largest square that fits: {res.max_square_px} px")
    if res.sweep is not None:
        lines.append("")
        lines.append(render_sweep(res))
    if res.formats is not None:
        lines.append("")
        lines.append(render_formats(res.formats))
    return "\n".join(lines)


def _heading(r: EstimateRequest) -> str:
    """'sdxl 1024x1024, batch 1, fp16 (VAE fp16), sdp attention, offload none, a1111'; a DiT names its
    weight format and T5's: 'flux1-dev 1024x1024, batch 1, nf4 (T5 fp8_e4m3fn), sdp attention, forge'."""
    size = f"{r.family} {r.width}x{r.height}, batch {r.batch}" + (f", hires x{r.hires_scale:g}" if r.hires_scale > 1 else "")
    if r.family in DIT_FAMILIES:
        t5 = _text_format_name(r)
        offload = f", offload {r.offload}" if r.offload != "none" else ""
        tiled = ", VAE tiled" if r.tiled_vae else ""
        return (f"{size}, {_weight_format_name(r)} (T5 {t5 or 'not loaded'}{tiled}), {r.attention} attention"
                f"{offload}, {r.ui}")
    prec = r.weight_format or ("fp16" if r.precision == "half" else "fp32")
    vae = "fp16" if r.vae_precision == "half" else "fp32"
    return (f"{size}, {prec} (VAE {vae}{', tiled' if r.tiled_vae else ''}), {r.attention} attention, "
            f"offload {r.offload}, {r.ui}")


def render_formats(table: FormatsResult) -> str:
    """The --formats table: per format its weights, its peak whole, whether that fits, what streams per step and
    the relative s/it; then the recommendation and the footnotes ("—": why it cannot run here)."""
    from lowvram.cli import render

    rows: list[list[str | render.Cell]] = []
    cannot: dict[str, list[str]] = {}
    for r in table.rows:
        name = f"{r.format} ← your file" if r.format == table.current else r.format
        fits: str | render.Cell = "?" if r.fits is None else render.Cell("yes", "ok") if r.fits else render.Cell("no", "fail")
        if not table.vram_known:
            speed, streamed = "?", "?"
        elif r.why_not or r.relative_sit is None:
            speed, streamed = "—", _gib(r.offloaded_mb) if r.offloaded_mb and not r.why_not else "—"
            cannot.setdefault(r.why_not or "does not run here", []).append(r.format)
        else:
            speed, streamed = f"{r.relative_sit:.2f}", _gib(r.offloaded_mb) if r.offloaded_mb else "0"
        rows.append([name, _gib(r.weights_mb), _gib(r.peak_mb), fits, streamed, speed])
    out = [render.table(("format", "weights", "peak", "fits whole", "streamed/step", "relative s/it"), rows,
                        right=(1, 2, 4, 5)),
           render.style(render.wrap("weights, peak (the model whole on the GPU) and streamed/step (read from RAM "
                                    "every step) in GiB; relative s/it: 1.00 = the fastest this UI loads"), "dim")]
    for why, names in cannot.items():
        out.append(render.style(render.wrap(f"— {', '.join(names)}: {why}"), "dim"))
    if table.recommended is not None:
        out.append(render.lead("recommended:", table.recommended.reason, "ok"))
    elif table.vram_known:
        out.append(render.lead("recommended:", "none: no format runs here in this UI", "fail"))
    return "\n".join(out)


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
    model: Annotated[str | None, typer.Option("--model", metavar="FAMILY|FILE", autocompletion=complete_model,
                                              help=MODEL_HELP)] = None,
    width: Annotated[int | None, typer.Option("--width", min=8, max=16384, metavar="PX", help="Image width (px).")] = None,
    height: Annotated[int | None, typer.Option("--height", min=8, max=16384, metavar="PX", help="Image height (px).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, max=256, metavar="N", help="Batch size.")] = None,
    precision: Annotated[PrecisionChoice | None, typer.Option("--precision", help="UNet/text encoder precision.")] = None,
    vae_precision: Annotated[
        PrecisionChoice | None, typer.Option("--vae-precision", help="VAE precision (full where --no-half-vae).")
    ] = None,
    tiled_vae: Annotated[bool, typer.Option("--tiled-vae", help="Decode the VAE in tiles (Tiled VAE extension).")] = False,
    ui: Annotated[UiChoice | None, typer.Option(
        "--ui", help="The UI that runs it (default: the WebUI found, else a1111; forge for Flux.1/SD3).")] = None,
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
    formats: Annotated[bool, typer.Option(
        "--formats", help="Which weight format of a Flux.1/SD3 model fits this card: per format its peak, what "
                          "streams from RAM per step, the relative speed, and a recommendation.")] = False,
    weight_format: Annotated[str | None, typer.Option(
        "--weight-format", metavar="FMT", help="The model's weight format (fp16, bf16, fp8_e4m3fn, nf4, q8_0, "
                                               "q4_k_s, ...; default: the model file's, else the precision's).")] = None,
    text_format: Annotated[str | None, typer.Option(
        "--text-format", metavar="FMT", help="T5-XXL's weight format for Flux.1/SD3 (default fp8_e4m3fn beside a "
                                             "quantised model, else fp16).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Estimate peak VRAM of one generation, its parts, and whether it fits this GPU.

    \b
    Examples:
      lowvram estimate --model sdxl --width 1024 --height 1024 --vram-mb 8192
      lowvram estimate --model flux1-dev --formats --vram-mb 12288
    """
    from lowvram.cli import render

    def val(choice: enum.Enum | None) -> str | None:
        return None if choice is None else str(choice.value)

    res = run_estimate(
        model=model.strip() if model and model.strip() else None, width=width, height=height, batch=batch, precision=val(precision),
        vae_precision=val(vae_precision), tiled_vae=tiled_vae, ui=val(ui), attention=val(attention),
        offload=val(offload), hires_scale=hires_scale, profile=profile, vram_mb=vram_mb,
        facts_file=facts, webui_arg=webui, sweep=sweep, weight_format=weight_format, text_format=text_format,
        formats=formats,
    )
    if json_out:
        render.emit_json(res.to_json())
        return
    print(render_text(res))
    for note in res.notes:
        render.note(note)
