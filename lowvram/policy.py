"""The policy engine: facts + profile + observations + overrides → Plan. Pure: no I/O, no probing.

Every setting is a Decision with its value, where it came from (cli, profile, auto, user,
remembered, observations, tuning) and why, so `lowvram plan` can explain itself and the whole
policy can be tested for every card in the matrix on a machine without a GPU (docs/architecture.md#the-policy).
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowvram import estimate as est
from lowvram.errors import ProfileError
from lowvram.facts import Facts, GpuFacts
from lowvram.gpuselect import GpuChoice, select_gpu
from lowvram.observations import Observation, comparable_key, measured_road, run_failed
from lowvram.plan import (
    Decision,
    EstimateSummary,
    ExtensionSpec,
    HookPlan,
    Overrides,
    Plan,
    ReservePlan,
    TcmallocPlan,
)
from lowvram.profiles import Profile, ResolvedProfile, Selection, match_failure
from lowvram.reserve import compute_reserve, laid_out
from lowvram.ui import Contradiction, UiSettings, adapter, parse_args
from lowvram.ui.base import FlagSet, ParsedFlag, UiAdapter

MIN_HEADROOM_LINUX_MB = 256
MIN_HEADROOM_WINDOWS_MB = 512
FORGE_INFERENCE_MB = 1024  # Forge's forge_inference_memory default (reference/a1111_integration.md §7)
SPILL_MISS_MB = 256  # overflow into shared memory that counts as a miss (docs/architecture.md#the-policy, "Offload ladder")
COMFORT_RUNS = 3  # runs with room to spare before trying one rung up
COMFORT_SHARE = 0.70  # "room to spare": peak reserved + headroom ≤ 70 % of the card
RECENT_RUNS = 10
ROAD_WINDOW = 5  # the latest measurements per road in one comparable group
FAILURE_TEXT = 80  # how much of a recorded failure reason the road's reason quotes
DEFAULT_TARGET = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024}
ESTIMATE_FAMILIES = ("sd15", "sd2", "sdxl", "sdxl-refiner")
ALLOC_LAYOUT_CONFLICTS = {
    "max_split_size_mb": "stops the freed reserve block from serving smaller requests",
    "backend": "cudaMallocAsync bypasses PyTorch's block cache, which the layout relies on",
    "expandable_segments": "changes how segments map physical pages; untested with the layout",
    "garbage_collection_threshold": "acts only after set_per_process_memory_fraction, which A1111 never calls",
}


@dataclass(frozen=True)
class FamilyChoice:
    family: str | None
    source: str
    reason: str


def resolve_family(facts: Facts, overrides: Overrides, profile: ResolvedProfile | None) -> FamilyChoice:
    """The model family: the WebUI's checkpoint > --model > an explicit profile's match.model."""
    webui_family = facts.webui.model_family if facts.webui else None
    if webui_family and webui_family != "unknown":
        reason = f"the selected checkpoint {facts.webui.checkpoint!r} is {webui_family}" if facts.webui else ""
        if overrides.model and overrides.model != _base_family(webui_family):
            reason += f" (--model {overrides.model} ignored: the checkpoint says otherwise)"
        return FamilyChoice(webui_family, "auto", reason)
    if overrides.model:
        return FamilyChoice(overrides.model, "cli", f"--model {overrides.model}")
    if profile is not None and overrides.explicit_profile and len(profile.profile.match.model) >= 1:
        fam = profile.profile.match.model[0]
        return FamilyChoice(fam, "profile", f"profile {profile.name} is for {fam}")
    w = facts.webui
    if (w is not None and w.flavor == "a1111" and w.checkpoint is None
            and "--no-download-sd-model" not in (w.user_args or ())):
        # A1111 with no checkpoint at all downloads v1-5-pruned-emaonly at its first start and loads it.
        return FamilyChoice("sd15", "auto", "no checkpoint yet: A1111's first start downloads and loads "
                            "SD 1.5 (v1-5-pruned-emaonly); the next plan follows the checkpoint it finds")
    return FamilyChoice(None, "auto", "unknown: no checkpoint selected and no --model")


def require_family(choice: FamilyChoice, facts: Facts) -> str:
    if choice.family:
        return choice.family
    if facts.webui and facts.webui.checkpoint_error:
        raise ProfileError(f"{facts.webui.checkpoint_error}; its model family is unknown",
                           "give --model sd15, sd2 or sdxl (and re-download the checkpoint or select another)")
    if facts.webui and facts.webui.model_family == "unknown":
        raise ProfileError(
            f"cannot tell the model family of {facts.webui.checkpoint or 'the selected checkpoint'}",
            "give --model sd15, sd2 or sdxl",
        )
    raise ProfileError("the model family is unknown (no checkpoint selected)", "give --model sd15, sd2 or sdxl")


def _warn_damaged_inputs(b: _Builder, facts: Facts, fam: str, fam_choice: FamilyChoice) -> None:
    """Damaged optional inputs the WebUI probe read past (detect/webui.py): the plan says so."""
    w = facts.webui
    if w is not None and w.config_error:
        b.warn(f"{w.config_error} (fix it, or move it away)")
    if w is not None and w.checkpoint_error:
        b.warn(f"{w.checkpoint_error}: planned as {fam} ({fam_choice.reason}); re-download it or select another")


def _base_family(family: str | None) -> str | None:
    return "sdxl" if family == "sdxl-refiner" else family


# ---------------------------------------------------------------------------------------------
# GPU choice (lowvram.gpuselect, written beside this module; a plain fallback until it lands)


def choose_gpu(facts: Facts, device_flag_value: str | None, ui: UiAdapter | None = None) -> GpuChoice:
    """The GPU the UI would use, worked out as CUDA does (lowvram.gpuselect, docs/architecture.md#detection)."""
    return _choose_gpu(facts, device_flag_value, ui)[0]


def _choose_gpu(facts: Facts, device_flag_value: str | None,
                ui: UiAdapter | None) -> tuple[GpuChoice, str | None]:
    """The choice, and a warning when the user's device flag names no GPU CUDA would see.

    Such a flag makes the UI fail at start-up; it does not make the machine GPU-less, so the plan
    goes on for the GPU the UI would use without it (never CPU mode, docs/architecture.md#detection, docs/architecture.md#the-policy).
    """
    sets_visible = bool(ui and ui.device_flag_sets_visible)
    choice = select_gpu(facts, device_flag_value, flag_sets_visible=sets_visible)
    if choice.gpu is not None or device_flag_value is None or not facts.usable_gpus:
        return choice, None
    fallback = select_gpu(facts, None)
    if fallback.gpu is None:
        return choice, None
    flag = (ui.device_flag if ui else None) or "device flag"
    warning = (f"your {flag} {device_flag_value} does not name a GPU CUDA would use ({choice.reason}): "
               f"planned for {fallback.reason.split(': ', 1)[-1]} instead")
    return fallback, warning


def target_ui(facts: Facts, overrides: Overrides) -> str:
    """--ui > the WebUI tree's flavor > A1111."""
    if overrides.ui:
        return overrides.ui
    if facts.webui is not None and facts.webui.flavor:
        return facts.webui.flavor
    return "a1111"


def user_device_flag(facts: Facts, ui_key: str) -> str | None:
    """The value of the UI's device flag in the user's literal COMMANDLINE_ARGS, if any."""
    if facts.webui is None or facts.webui.flavor != ui_key or not facts.webui.user_args_literal:
        return None
    ui = adapter(ui_key)
    parsed = parse_args(tuple(facts.webui.user_args or ()), ui.flagset(facts.webui.version), strict=False)
    return next((p.value for p in parsed if p.name == ui.device_flag and p.value), None)


def webui_gpu(facts: Facts) -> GpuChoice:
    """The GPU the facts' WebUI (A1111 when there is none) would run on, with its own device flag.

    doctor, estimate and reserve use this, so they size the same card `plan` does.
    """
    ui_key = facts.webui.flavor if facts.webui is not None else "a1111"
    return choose_gpu(facts, user_device_flag(facts, ui_key), adapter(ui_key))


def gpu_for(facts: Facts, overrides: Overrides) -> GpuFacts | None:
    """The GPU the plan targets (what auto-selection matches profiles against)."""
    ui_key = target_ui(facts, overrides)
    return choose_gpu(facts, user_device_flag(facts, ui_key), adapter(ui_key)).gpu


def headroom_floor(os_name: str, wsl: bool = False) -> int:
    """The least VRAM other programs hold: the desktop compositor on Windows (and under WSL)."""
    return MIN_HEADROOM_WINDOWS_MB if os_name == "windows" or wsl else MIN_HEADROOM_LINUX_MB


def headroom_mb(facts: Facts, gpu: GpuFacts | None) -> int:
    """What other programs hold (measured total − free), at least 256 MiB Linux / 512 MiB Windows."""
    floor = headroom_floor(facts.system.os, facts.system.wsl)
    if gpu is None or gpu.vram_total_mb is None or gpu.vram_free_mb is None:
        return floor
    return max(floor, gpu.vram_total_mb - gpu.vram_free_mb)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class _Builder:
    decisions: list[Decision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, setting: str, value: Any, source: str, reason: str) -> None:
        self.decisions.append(Decision(setting, value, source, reason))

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


def _torch_base(version: str | None) -> str | None:
    return version.split("+", 1)[0].strip() if version else None


def xformers_usable(ui: UiAdapter, gpu: GpuFacts | None, facts: Facts, *,
                    assume_gpu: bool = False, xformers_builds: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """docs/architecture.md#the-policy: sm 6.0–9.0, and the xformers the UI installs matches the venv's torch (or no torch yet).

    An xformers already in the venv is the one that loads (A1111 installs its pin only when xformers
    is missing), so when `xformers_builds` (xformers version → the torch it was built for, data)
    knows it, that build must match the venv's torch instead.
    assume_gpu: no GPU is visible but an explicit profile is planned as written for one.
    """
    sm = "the profile's GPU"
    if gpu is None and not assume_gpu:
        return False, "no NVIDIA GPU"
    if gpu is not None:
        cc = gpu.cc_tuple
        if cc is None:
            return False, "the GPU's compute capability is unknown"
        if not (6, 0) <= cc <= (9, 0):
            return False, f"xformers needs compute capability 6.0–9.0 (this GPU is {gpu.compute_capability})"
        sm = f"sm {gpu.compute_capability}"
    if ui.pinned_xformers is None:
        return False, f"{ui.title} does not install xformers through a flag"
    xf, torch_for = ui.pinned_xformers
    torch_now = _torch_base(facts.webui.torch) if facts.webui else None
    installed = _torch_base(facts.webui.xformers) if facts.webui else None
    built_for = (xformers_builds or {}).get(installed or "")
    if installed and built_for and torch_now:
        if built_for == torch_now:
            return True, f"{sm}; the venv's xformers {installed} is built for its torch {torch_now}"
        return False, (f"the venv's xformers {installed} is built for torch {built_for}, not its torch {torch_now} "
                       f"({ui.title} keeps an installed xformers, so it would fail to load)")
    if torch_now is None:
        return True, f"{sm}; the UI installs its pinned torch {torch_for} + xformers {xf}"
    if torch_now == torch_for:
        return True, f"{sm}; xformers {xf} (what {ui.title} installs) is built for torch {torch_now}"
    return False, f"{ui.title} installs xformers {xf}, built for torch {torch_for}, but the venv has torch {torch_now}"


def _recent(observations: Sequence[Observation], checkpoint: str | None) -> list[Observation]:
    runs = [o for o in observations if o.source in ("hook", "tuning")
            and (checkpoint is None or o.checkpoint in (None, checkpoint))]
    return sorted(runs, key=lambda o: o.time)[-RECENT_RUNS:]


def _tuned_road(observations: Sequence[Observation], checkpoint: str | None, gpu: GpuFacts | None,
                size: tuple[int, int]) -> tuple[str, str, str] | None:
    """`lowvram tune` measured both roads at the target size: its winner stands (docs/architecture.md#tune).

    Only tune's own probes count here; the hook's runs keep the median comparison below.
    """
    from lowvram import tuning

    # A probe planned for the resident road whose layout did not run measured nothing about it.
    probes = [o for o in observations if o.source == "tuning" and laid_out(o)]
    if not probes:
        return None
    state = tuning.tuning_state(probes, checkpoint, gpu.driver if gpu else None, size)
    measured = {p.road for p in state.probes if p.sit is not None}
    if state.best is None or measured != {"swap", "resident"}:
        return None
    return (state.best.road, "tuning",
            f"tuned: the {state.best.road} road was faster ({state.best.sit:.3f} s/it at {size[0]}×{size[1]}; "
            "`lowvram tune` measured both roads)")


def _missed(o: Observation, spill_possible: bool) -> bool:
    if o.ooms > 0 or (not o.ok and "oom" in o.reason.lower()):
        return True
    return bool(spill_possible and not o.layout and (o.overflow_mb or 0) > SPILL_MISS_MB)


# ---------------------------------------------------------------------------------------------
# Choosing the road from observations (docs/architecture.md#the-policy, "Two roads")


@dataclass(frozen=True)
class RoadChoice:
    road: str
    source: str
    reason: str
    warning: str | None = None


def _road_history(observations: Sequence[Observation], checkpoint: str | None,
                  driver: str | None) -> list[Observation]:
    """Hook and tuning runs of this checkpoint on this driver (where both are known), oldest first.

    All of them, not only the last RECENT_RUNS: a road's last failure must not age out behind
    runs on the other road, and the comparison looks for its own size and device among them.
    """
    runs = [o for o in observations if o.source in ("hook", "tuning")
            and (checkpoint is None or o.checkpoint in (None, checkpoint))
            and not (driver and o.driver and o.driver != driver)]
    return sorted(runs, key=lambda o: o.time)


def _is_probe(o: Observation) -> bool:
    """A run of `lowvram tune` (its saved probe, or a hook record tagged with tune's run tag)."""
    return o.source == "tuning" or (o.tag or "").startswith("tune")


def _road_failure(o: Observation, road: str, rung: str) -> bool | None:
    """What run `o` says about `road` (the swap road on `rung`): True failed, False worked, None nothing.

    The swap road is the run's offload rung: a run on another rung is another swap road (the
    ladder moves off a rung that ran out of memory). A tune probe on the resident road that failed
    with its layout in place failed at that reserve (tune tries reserves that may not fit), not
    the road; one whose layout failed or was refused did fail the road.
    """
    if o.road != road or (road == "swap" and o.offload != rung):
        return None
    if run_failed(o):
        if road == "resident" and _is_probe(o) and not o.layout_error:
            return None
        return True
    return False if measured_road(o) == road else None


def _last_failures(history: Sequence[Observation], rung: str) -> dict[str, Observation]:
    """The roads whose latest run (that said anything about the road) failed, with that run."""
    failed: dict[str, Observation] = {}
    for road in ("swap", "resident"):
        for o in reversed(history):
            verdict = _road_failure(o, road, rung)
            if verdict is not None:
                if verdict:
                    failed[road] = o
                break
    return failed


def _failure_text(o: Observation) -> str:
    """The recorded reason, short: the layout's error, else the job's reason."""
    if o.layout_error:
        text = f"layout failed: {o.layout_error}"
    elif o.reason:
        text = o.reason
    else:
        text = "out of memory" if o.ooms else "the job failed"
    text = " ".join(text.split())
    return text if len(text) <= FAILURE_TEXT else text[:FAILURE_TEXT - 1].rstrip() + "…"


def _avoid_failed(failed: Mapping[str, Observation], rung: str) -> RoadChoice:
    """Never pick a road whose last run failed; with both failed, the safer swap road, warned."""
    swap, res = failed.get("swap"), failed.get("resident")
    if swap is not None and res is not None:
        both = f"swap on {rung}: {_failure_text(swap)}; resident: {_failure_text(res)}"
        return RoadChoice("swap", "observations", f"the last runs on both roads failed ({both}): the swap road, "
                          "the safer one", f"the last runs on both roads failed ({both}): planned the swap road; "
                          "the UI's console says more")
    if res is not None:
        return RoadChoice("swap", "observations", f"resident road: its last run failed ({_failure_text(res)}); "
                          "the swap road (--layout on tries the resident road again)")
    assert swap is not None
    return RoadChoice("resident", "observations", f"swap road on {rung}: its last run failed "
                      f"({_failure_text(swap)}); the resident road")


@dataclass(frozen=True)
class _Comparison:
    key: tuple[object, ...]
    swap: float
    resident: float
    unit: str  # "s/it" or "s/image"
    runs: tuple[int, int]
    steps: int | None  # the step count of a wall-time comparison
    latest: float


def _measurements(history: Sequence[Observation], rung: str) -> dict[tuple[object, ...], dict[str, list[Observation]]]:
    """Successful runs that really measured a road (the swap road on `rung` only), by comparable_key."""
    groups: dict[tuple[object, ...], dict[str, list[Observation]]] = {}
    for o in history:
        road = measured_road(o)
        if road is None or run_failed(o) or (o.sit is None and o.wall_s is None):
            continue
        if road == "swap" and o.offload != rung:
            continue
        groups.setdefault(comparable_key(o), {"swap": [], "resident": []})[road].append(o)
    return groups


def _compare(key: tuple[object, ...], swap: Sequence[Observation], res: Sequence[Observation]) -> _Comparison | None:
    """Swap against resident within one comparable group, or None where they cannot be compared.

    Wall time per image (`wall_s`) is the fairer figure: it holds what s/it hides, --medvram's
    model moves before and after sampling. It is compared where both roads have it at the same
    step count (the most recent such count); otherwise the median s/it, which does not depend on
    the step count. Each side is the median of its latest ROAD_WINDOW runs.
    """
    walls = {o.steps for o in swap if o.wall_s is not None} & {o.steps for o in res if o.wall_s is not None}
    walls.discard(None)
    if walls:
        steps = max(walls, key=lambda n: max(o.time for o in [*swap, *res] if o.steps == n))
        s = [o.wall_s for o in swap if o.wall_s is not None and o.steps == steps][-ROAD_WINDOW:]
        r = [o.wall_s for o in res if o.wall_s is not None and o.steps == steps][-ROAD_WINDOW:]
        unit, at_steps = "s/image", steps
    else:
        s = [o.sit for o in swap if o.sit is not None][-ROAD_WINDOW:]
        r = [o.sit for o in res if o.sit is not None][-ROAD_WINDOW:]
        unit, at_steps = "s/it", None
    if not s or not r:
        return None
    return _Comparison(key, statistics.median(s), statistics.median(r), unit, (len(s), len(r)), at_steps,
                       max(o.time for o in [*swap, *res]))


def _where(key: tuple[object, ...]) -> str:
    width, height, batch, device = key
    text = f"{width}×{height}" if width is not None and height is not None else "an unrecorded size"
    if batch != 1:
        text += f" batch {batch}"
    return text + (f" on {device}" if device else " (device not recorded)")


def _preferred(keys: Iterable[tuple[object, ...]], target: tuple[object, ...],
               latest: Callable[[tuple[object, ...]], float]) -> tuple[object, ...]:
    """The plan's target size and batch (its device first), else the group measured most recently."""
    keys = list(keys)
    at_target = [k for k in keys if k[:3] == target[:3]]
    return max(at_target or keys, key=lambda k: (k[3] == target[3], latest(k)))


def _measured_choice(history: Sequence[Observation], rung: str, target: tuple[object, ...]) -> RoadChoice:
    """The faster road where a like-with-like pair exists (the target's size first), else explore."""
    groups = _measurements(history, rung)
    pairs = {key: c for key, g in groups.items() if (c := _compare(key, g["swap"], g["resident"])) is not None}
    if pairs:
        c = pairs[_preferred(pairs, target, lambda k: pairs[k].latest)]
        faster = "resident" if c.resident < c.swap else "swap"
        how = f"wall time per image at {c.steps} steps, median" if c.steps is not None else "median"
        return RoadChoice(faster, "observations", f"measured at {_where(c.key)}: swap {c.swap:.2f} {c.unit} vs "
                          f"resident {c.resident:.2f} {c.unit} ({how} of {c.runs[0]}/{c.runs[1]} runs): "
                          f"{faster} is faster")
    measured = {measured_road(o) for o in history if not run_failed(o) and (o.sit is not None or o.wall_s is not None)}
    if "swap" not in measured:
        return RoadChoice("swap", "auto", "exploring: the profile's road (swap) first, measured before the other")
    if "resident" not in measured:
        return RoadChoice("resident", "auto", "exploring: the resident road once, reserve 0 first so free and "
                          "overflow get measured")
    # Both measured, never like with like: measure the road missing where the user generates.
    key = _preferred(groups, target, lambda k: max(o.time for runs in groups[k].values() for o in runs))
    road = "swap" if not groups[key]["swap"] else "resident"
    return RoadChoice(road, "auto", f"exploring: no swap (on {rung}) and resident runs at the same size and device "
                      f"to compare yet: the {road} road, to measure it at {_where(key)}")


def _resident_failed(observations: Sequence[Observation], checkpoint: str | None, gpu: GpuFacts | None) -> str | None:
    """Why the resident road's last run failed, or None when it did not."""
    history = _road_history(observations, checkpoint, gpu.driver if gpu else None)
    failed = _last_failures(history, "").get("resident")
    return None if failed is None else _failure_text(failed)


def _auto_road(observations: Sequence[Observation], checkpoint: str | None, gpu: GpuFacts | None, *,
               rung: str, target: tuple[int, int, int]) -> RoadChoice:
    """`--layout auto` where both roads exist: not a road that just failed, then tune's winner, then
    the faster measured like with like, else explore (docs/architecture.md#the-policy)."""
    driver = gpu.driver if gpu else None
    history = _road_history(observations, checkpoint, driver)
    failed = _last_failures(history, rung)
    if failed:
        return _avoid_failed(failed, rung)
    tuned = _tuned_road(observations, checkpoint, gpu, target[:2])
    if tuned is not None:
        return RoadChoice(*tuned)
    return _measured_choice(history, rung, (*target, "cuda"))


def _est_attention(attention: str) -> str:
    """The estimator's backend for a planned one (a user's --opt-split-attention-v1 included)."""
    mapped = {"sdp-no-mem": "sdp", "auto": "sdp", "split-v1": "split", "invokeai": "split"}.get(attention, attention)
    return mapped if mapped in est.ATTENTIONS else "sdp"


def _est_offload(rung: str) -> str:
    return {"novram": "lowvram", "cpu": "none"}.get(rung, rung)


def _estimate(family: str, *, width: int, height: int, target_batch: int, hires: float, precision: str,
              vae: str, attention: str, rung: str, ui_key: str, bcu: bool) -> est.Estimate:
    att, off = _est_attention(attention), _est_offload(rung)
    req = est.EstimateRequest(family=family, width=width, height=height, batch=target_batch,
                              precision="full" if precision == "full" else "half",
                              vae_precision="full" if vae == "full" else "half", attention=att,
                              offload=off, hires_scale=hires, ui=ui_key, batch_cond_uncond=bcu)
    return est.estimate(req)


# -- the pipeline: one step per setting `lowvram plan` shows, composed by plan() -----------------------


@dataclass(frozen=True)
class _Inputs:
    """What every step may read: the facts, the resolved profile, the observations and the overrides."""

    facts: Facts
    resolved: ResolvedProfile
    observations: Sequence[Observation]
    overrides: Overrides
    webui_path: str | None
    xformers_builds: Mapping[str, str] | None

    @property
    def prof(self) -> Profile:
        return self.resolved.profile


@dataclass(frozen=True)
class _UiStep:
    """The UI decided, with its adapter, version and the user's own flags (literal COMMANDLINE_ARGS)."""

    key: str
    ui: UiAdapter
    version: str | None
    flagset: FlagSet
    user_tokens: tuple[str, ...]
    user_literal: bool
    user_parsed: list[ParsedFlag]
    user_device: str | None


@dataclass(frozen=True)
class _GpuStep:
    """The GPU decided, and the mode it puts the plan in (an NVIDIA GPU, a foreign one, CPU, as written)."""

    choice: GpuChoice
    device_warning: str | None
    foreign: bool
    cpu_mode: bool
    as_written: bool
    room: int

    @property
    def gpu(self) -> GpuFacts | None:
        return self.choice.gpu

    @property
    def vram_total(self) -> int | None:
        return self.choice.gpu.vram_total_mb if self.choice.gpu else None

    @property
    def no_nvidia(self) -> bool:
        return self.cpu_mode or self.foreign


@dataclass(frozen=True)
class _Target:
    width: int
    height: int
    batch: int
    hires: float
    bcu: bool


@dataclass(frozen=True)
class _Merge:
    """The plan's flags merged with the user's, and the settings a user's flag took over."""

    merge: str
    user_dropped: list[str]
    user_kept: list[str]
    plan_dropped: list[str]
    plan_args: list[str]
    offload: str
    attention: str


class _Fits:
    """Whether a rung's estimate fits, estimating each rung once (the estimate summary reuses them)."""

    def __init__(self, fam: str, g: _GpuStep, t: _Target, *, unet: str, vae: str, attention: str,
                 ui_key: str) -> None:
        self.estimates: dict[str, est.Estimate] = {}
        self.can_estimate = fam in ESTIMATE_FAMILIES and not g.cpu_mode and not g.foreign
        self._fam, self._g, self._t = fam, g, t
        self._unet, self._vae, self.attention, self._ui_key = unet, vae, attention, ui_key

    def __call__(self, rung: str) -> bool | None:
        vram_total = self._g.vram_total
        if not self.can_estimate or vram_total is None:
            return None
        if rung not in self.estimates:
            t = self._t
            self.estimates[rung] = _estimate(self._fam, width=t.width, height=t.height, target_batch=t.batch,
                                             hires=t.hires, precision=self._unet, vae=self._vae,
                                             attention=self.attention, rung=rung, ui_key=self._ui_key, bcu=t.bcu)
        return est.fits(self.estimates[rung].peak_mb, vram_total, self._g.room)


def _decide_profile(b: _Builder, inp: _Inputs, selection: Selection | None) -> None:
    prof, overrides = inp.prof, inp.overrides
    if selection is not None and not overrides.explicit_profile:
        b.add("profile", prof.name, "auto", selection.reason)
    else:
        src = "remembered" if overrides.profile_source == "remembered" else "cli"
        why = "remembered for this WebUI from an earlier apply/launch" if src == "remembered" else f"--profile {prof.name}"
        b.add("profile", prof.name, src, why)


def _decide_ui(b: _Builder, inp: _Inputs) -> _UiStep:
    facts, overrides = inp.facts, inp.overrides
    flavor = facts.webui.flavor if facts.webui else None
    if overrides.ui:
        ui_key = overrides.ui
        b.add("ui", ui_key, "cli", f"--ui {ui_key}")
        if flavor and flavor != ui_key:
            b.warn(f"--ui {ui_key} given, but the WebUI at {inp.webui_path} is {flavor}: its flags are planned for {ui_key}")
    elif flavor:
        ui_key = flavor
        b.add("ui", ui_key, "auto", f"the WebUI tree is {flavor}")
    else:
        ui_key = "a1111"
        b.add("ui", ui_key, "auto", "no WebUI found and no --ui: planning for A1111")
    ui = adapter(ui_key)
    version = facts.webui.version if facts.webui and facts.webui.flavor == ui_key else None
    return _user_flags(facts, ui_key, ui, version)


def _user_flags(facts: Facts, ui_key: str, ui: UiAdapter, version: str | None) -> _UiStep:
    """The user's own flags (literal COMMANDLINE_ARGS), read where the tree is this UI."""
    flagset = ui.flagset(version)
    user_tokens: tuple[str, ...] = ()
    user_literal = True
    if facts.webui is not None and facts.webui.flavor == ui_key:
        user_literal = facts.webui.user_args_literal
        user_tokens = tuple(facts.webui.user_args or ())
    user_parsed = parse_args(user_tokens, flagset, strict=False) if user_literal else []
    user_device = next((p.value for p in user_parsed if p.name == ui.device_flag and p.value), None)
    return _UiStep(ui_key, ui, version, flagset, user_tokens, user_literal, user_parsed, user_device)


def _decide_family(b: _Builder, inp: _Inputs, family: FamilyChoice | None) -> str:
    fam_choice = family or resolve_family(inp.facts, inp.overrides, inp.resolved)
    fam = require_family(fam_choice, inp.facts)
    b.add("model", fam, fam_choice.source, fam_choice.reason)
    _warn_damaged_inputs(b, inp.facts, fam, fam_choice)
    return fam


def _decide_gpu(b: _Builder, inp: _Inputs, u: _UiStep, fam: str) -> _GpuStep:
    facts, prof, overrides, ui = inp.facts, inp.prof, inp.overrides, u.ui
    choice, device_warning = _choose_gpu(facts, u.user_device, ui)
    if device_warning:
        replaced = bool(choice.pin_uuid) and not ui.device_flag_sets_visible  # rewritten to 0 below
        b.warn(device_warning + ("" if replaced else "; the UI fails to start with that value: fix or remove it"))
    gpu = choice.gpu
    foreign = gpu is None and bool(facts.other_gpus)
    # An explicit profile applies as written even where no GPU is visible (planning for another
    # machine); CPU mode is for auto-selection on a machine with no GPU at all, or the cpu profile.
    cpu_mode = not foreign and (prof.offload == "cpu" or (gpu is None and not overrides.explicit_profile))
    as_written = gpu is None and not foreign and not cpu_mode
    if gpu is not None:
        b.add("gpu", f"{gpu.name} ({gpu.vram_total_mb} MiB)" if gpu.vram_total_mb else gpu.name, "auto", choice.reason)
    elif foreign:
        names = ", ".join(f"{o.vendor} {o.name or ''}".strip() for o in facts.other_gpus)
        b.add("gpu", None, "auto", f"no NVIDIA GPU ({names}): lowvram is built for NVIDIA and adds no device "
                                   "or offload flags; the UI's own setup (ROCm, webui-macos-env.sh) stands")
        b.warn(f"lowvram is built for NVIDIA GPUs; this machine has {names}: no device or offload flags planned")
    elif as_written:
        b.add("gpu", None, "auto", f"no usable GPU here ({facts.nvml_error or 'NVML found none'}): planning "
                                   f"profile {prof.name} as written")
    else:
        why_none = choice.reason if facts.gpus else (facts.nvml_error or "NVML found none")
        b.add("gpu", None, "auto", f"no usable GPU ({why_none}): CPU mode")
    if overrides.explicit_profile:
        why_not = match_failure(prof, facts, fam, gpu)
        if why_not:
            b.warn(f"profile {prof.name} does not match this machine ({why_not}); applied as written")
    return _GpuStep(choice, device_warning, foreign, cpu_mode, as_written, headroom_mb(facts, gpu))


def _decide_sysmem_fallback(b: _Builder, inp: _Inputs) -> str:
    facts, prof, overrides = inp.facts, inp.prof, inp.overrides
    if overrides.sysmem_fallback in ("on", "off"):
        fallback, fb_src, fb_why = overrides.sysmem_fallback, "cli", f"--sysmem-fallback {overrides.sysmem_fallback}"
    elif prof.sysmem_fallback in ("on", "off"):
        fallback, fb_src, fb_why = prof.sysmem_fallback, "profile", f"profile {prof.name} says {prof.sysmem_fallback}"
    else:
        detected = facts.system.sysmem_fallback
        fallback = "on" if detected in ("on", "unknown") else "off"
        fb_src = "auto"
        fb_why = {
            "on": "the driver spills into shared memory (Windows 536.40–546.00, or WSL2)",
            "unknown": "driver ≥ 546.01: the Control Panel choice cannot be read; the default is on",
            "unsupported": "this platform never spills into shared memory (native Linux/macOS or an older driver)",
            "off": "the driver does not spill",
        }.get(detected, detected)
    b.add("sysmem_fallback", fallback, fb_src, fb_why)
    return fallback


def _decide_attention(b: _Builder, inp: _Inputs, u: _UiStep, g: _GpuStep) -> str:
    facts, prof, ui_key = inp.facts, inp.prof, u.key
    if g.no_nvidia:
        b.add("attention", "auto", "auto", "no NVIDIA GPU: the UI's default")
        return "auto"
    ok, why = xformers_usable(u.ui, g.gpu, facts, assume_gpu=g.as_written, xformers_builds=inp.xformers_builds)
    wanted = prof.attention
    if ui_key == "comfyui" and wanted in ("auto", "xformers"):
        # ComfyUI installs no xformers and uses it whenever it imports, else PyTorch SDP: forcing
        # --use-pytorch-cross-attention would only turn off an xformers the user installed.
        installed = facts.webui.xformers if facts.webui and facts.webui.flavor == "comfyui" else None
        attention, src = "auto", "auto"
        why2 = ("ComfyUI picks by itself: xformers when it imports"
                + (f" (xformers {installed} is in its venv)" if installed else "") + ", else PyTorch SDP")
        if wanted == "xformers":
            src, why2 = "profile", f"profile {prof.name} prefers xformers; {why2}"
    elif wanted == "auto":
        if ui_key == "forge":
            attention, src, why2 = "auto", "auto", "Forge picks by itself (xformers when it imports, else PyTorch SDP)"
        elif ok and ui_key == "a1111":
            attention, src, why2 = "xformers", "auto", why
        else:
            attention, src, why2 = "sdp", "auto", f"PyTorch SDP ({why})" if not ok else "PyTorch SDP: torch ≥ 2 has it built in"
    elif wanted == "xformers" and not ok:
        attention, src, why2 = "sdp", "auto", f"profile asks for xformers, but {why}: PyTorch SDP instead"
        b.warn(f"xformers is not usable here ({why}); planned SDP attention instead")
    else:
        attention, src, why2 = wanted, "profile", f"profile {prof.name}" + (f": {why}" if wanted == "xformers" else "")
    b.add("attention", attention, src, why2)
    return attention


def _decide_precision(b: _Builder, inp: _Inputs, g: _GpuStep) -> tuple[str, str]:
    prof, gpu = inp.prof, g.gpu
    unet_prec, vae_prec = prof.precision.unet, prof.precision.vae
    if g.cpu_mode:
        unet_prec, vae_prec = "full", "full"
        b.add("precision.unet", "full", "auto", "CPU mode runs in fp32 (no fp16 on the CPU)")
    elif gpu is not None and unet_prec == "half" and "GTX 16" in (gpu.name or "") and gpu.cc_tuple == (7, 5):
        unet_prec = "upcast"
        b.add("precision.unet", "upcast", "auto",
              "GTX 16xx produces NaN (black) images in fp16: --upcast-sampling (--no-half is the fallback)")
    else:
        prec_src = "profile" if inp.resolved.origins.get("precision.unet", "default") != "default" else "auto"
        b.add("precision.unet", unet_prec, prec_src,
              f"profile {prof.name}" if unet_prec != "half" else "fp16 weights (the default)")
    if not g.cpu_mode:
        b.add("precision.vae", vae_prec, "profile" if vae_prec != "half" else "auto",
              "VAE in fp32 (avoids NaN/black images at decode)" if vae_prec == "full" else "VAE in fp16 (the default)")
    return unet_prec, vae_prec


def _decide_target(inp: _Inputs, fam: str) -> _Target:
    prof, facts = inp.prof, inp.facts
    side = DEFAULT_TARGET.get(fam, 512)
    bcu = facts.webui.batch_cond_uncond if facts.webui and facts.webui.batch_cond_uncond is not None else True
    return _Target(prof.target.width or side, prof.target.height or side, prof.target.batch,
                   prof.target.hires_scale, bcu)


def _decide_offload(b: _Builder, inp: _Inputs, g: _GpuStep, *, rungs: Sequence[str], fits: _Fits,
                    recent: Sequence[Observation], spill_possible: bool) -> tuple[str, str, str]:
    """The offload rung before the road: (rung, source, reason)."""
    prof, overrides = inp.prof, inp.overrides
    offload_src = "auto"
    if g.cpu_mode:
        offload, offload_why = "cpu", "no usable GPU: the UI runs on the CPU"
        if prof.offload != "cpu":
            b.warn("no usable GPU was found: planning CPU mode (slow)")
    elif g.foreign:
        offload, offload_why = "none", "no NVIDIA GPU: no offload flags"
    elif overrides.offload and overrides.offload != "auto":
        offload, offload_src, offload_why = overrides.offload, "cli", f"--offload {overrides.offload}"
    elif prof.offload != "auto" and overrides.offload != "auto":
        offload, offload_src = prof.offload, "profile"
        offload_why = f"pinned by profile {prof.name}: the margin is too thin to trust an estimate"
        for o in recent:
            if o.offload == offload and _missed(o, spill_possible):
                b.warn(f"a recent run on the pinned rung {offload} ran out of memory or spilled: "
                       "try --offload with a lower rung")
                break
    else:
        offload, offload_why = _ladder(rungs, fits, fits.estimates, g.vram_total, g.room)
        offload_src = "cli" if overrides.offload == "auto" else "auto"
        offload, offload_src, offload_why = _ladder_learns((offload, offload_src, offload_why), g, rungs=rungs,
                                                           recent=recent, spill_possible=spill_possible)
    return offload, offload_src, offload_why


def _ladder_learns(ladder: tuple[str, str, str], g: _GpuStep, *, rungs: Sequence[str],
                   recent: Sequence[Observation], spill_possible: bool) -> tuple[str, str, str]:
    """Observations move the ladder's rung: a miss pushes one rung down, and a miss on that rung one
    further (the ladder walks down while the rung it lands on has missed too); comfortable runs let
    it try one up."""
    offload, offload_src, offload_why = ladder
    idx = rungs.index(offload) if offload in rungs else 0
    steps: list[str] = []
    while idx + 1 < len(rungs):
        missed_here = [o for o in recent if o.offload == rungs[idx] and _missed(o, spill_possible)]
        if not missed_here:
            break
        last = missed_here[-1]
        oom = last.ooms > 0 or (not last.ok and "oom" in last.reason.lower())
        what = "ran out of memory" if oom else f"spilled {last.overflow_mb} MiB into shared memory"
        steps.append(f"a run on {rungs[idx]} {what}")
        idx += 1
    if steps:
        offload_why = "; ".join(steps) + (": one rung down" if len(steps) == 1 else f": {len(steps)} rungs down")
        return rungs[idx], "observations", offload_why
    if idx > 0:
        vram_total = g.vram_total
        here = [o for o in recent if o.offload == offload and o.peak_reserved_mb is not None]
        upper = rungs[idx - 1]
        missed_upper = any(o.offload == upper and _missed(o, spill_possible) for o in recent)
        if (len(here) >= COMFORT_RUNS and vram_total and not missed_upper
                and all(not _missed(o, spill_possible) for o in here)
                and all((o.peak_reserved_mb or 0) + g.room <= COMFORT_SHARE * vram_total for o in here)):
            return upper, "observations", f"{len(here)} runs on {offload} had room to spare: trying one rung up"
    return offload, offload_src, offload_why


def _map_to_ui_rung(offload: str, offload_why: str, u: _UiStep, g: _GpuStep, rungs: Sequence[str]) -> tuple[str, str]:
    """A rung this UI does not have becomes its nearest one, and the reason says so."""
    mapped = _map_rung(offload, rungs)
    if offload not in ("cpu", "none") and offload not in rungs and not g.foreign and mapped != offload:
        offload_why += f" ({u.ui.title} has no {offload} rung: {mapped})"
        offload = mapped
    return offload, offload_why


def _decide_road(b: _Builder, inp: _Inputs, u: _UiStep, g: _GpuStep, *, spill_possible: bool, rung: str,
                checkpoint: str | None, target: _Target) -> RoadChoice:
    facts, prof, overrides, gpu, vram_total = inp.facts, inp.prof, inp.overrides, g.gpu, g.vram_total
    ram_ok = bool(facts.system.ram_mb and vram_total and facts.system.ram_mb >= 2 * vram_total)
    resident_possible = u.key == "a1111" and spill_possible and ram_ok and gpu is not None and not g.cpu_mode
    why_no_resident = (
        "only A1111 runs the layout hook" if u.key != "a1111" else
        "memory cannot spill here (sysmem fallback off), so only the swap road exists" if not spill_possible else
        "no NVIDIA GPU" if gpu is None else
        f"RAM {facts.system.ram_mb} MiB is under 2 × VRAM" if not ram_ok else ""
    )
    layout_mode = overrides.layout or prof.layout.mode
    layout_src = "cli" if overrides.layout else "profile"
    if layout_mode == "off" or g.no_nvidia:
        return RoadChoice("swap", layout_src,
                          "--layout off / profile: the swap road" if layout_mode == "off" else "no NVIDIA GPU")
    if not resident_possible:
        if layout_mode == "on":
            b.warn(f"--layout on asked for the resident road, but {why_no_resident}")
        return RoadChoice("swap", "auto", f"swap road: {why_no_resident}")
    if layout_mode == "on":
        if (failed := _resident_failed(inp.observations, checkpoint, gpu)) is not None:
            asked = "--layout on" if layout_src == "cli" else f"profile {prof.name} (layout on)"
            b.warn(f"{asked}: the resident road's last run failed ({failed}); trying it again as asked")
        return RoadChoice("resident", layout_src, "--layout on: the resident road (model on the GPU, layout + reserve)")
    auto = _auto_road(inp.observations, checkpoint, gpu, rung=rung,
                      target=(target.width, target.height, target.batch))
    if auto.warning:
        b.warn(auto.warning)
    return RoadChoice(auto.road, auto.source, auto.reason)


def _record_offload_and_road(b: _Builder, offload: tuple[str, str, str], road: RoadChoice) -> str:
    """The resident road keeps the whole model on the GPU; both decisions are recorded here."""
    rung, src, why = offload
    if road.road == "resident" and rung != "none":
        why = f"resident road: whole model on the GPU (was {rung}; giant-kitten's premise)"
        rung, src = "none", road.source
    b.add("offload", rung, src, why)
    b.add("road", road.road, road.source, road.reason)
    return rung


def _decide_reserve(b: _Builder, inp: _Inputs, g: _GpuStep, road: str, *, checkpoint: str | None,
                    target: _Target) -> ReservePlan:
    prof = inp.prof
    if road == "resident":
        if isinstance(prof.layout.reserve, int):
            reserve = ReservePlan("fixed", prof.layout.reserve, True, source="profile",
                                  reason=f"fixed by profile {prof.name}")
        else:
            reserve = _reserve(inp.observations, checkpoint, g.vram_total, g.gpu, (target.width, target.height))
    else:
        reserve = ReservePlan("off", 0, False, source="none", reason="swap road: nothing should spill, no reserve")
    b.add("reserve", reserve.mb, reserve.source if reserve.source != "none" else "auto", reserve.reason)
    return reserve


def _decide_hook(b: _Builder, inp: _Inputs, u: _UiStep, reserve: ReservePlan) -> HookPlan:
    overrides = inp.overrides
    if u.key != "a1111":
        hook = HookPlan(False, f"the layout hook runs on A1111 only ({u.ui.title} moves weights itself)")
    elif overrides.no_hook:
        hook = HookPlan(False, "--no-hook")
    else:
        hook = HookPlan(True, "observes every generation (the ladder and the reserve learn from it)"
                        + ("; lays out the reserve" if reserve.applied else "; no layout on the swap road"))
    b.add("hook", hook.enabled, "cli" if overrides.no_hook else "auto", hook.reason)
    return hook


def _decide_allocator(b: _Builder, inp: _Inputs, reserve: ReservePlan) -> str:
    alloc = dict(inp.prof.alloc_conf)
    if reserve.applied:
        for key in list(alloc):
            if key in ALLOC_LAYOUT_CONFLICTS and (key != "backend" or "cudaMallocAsync" in alloc[key]):
                b.add(f"alloc_conf.{key}", None, "auto", f"dropped with the layout on: {ALLOC_LAYOUT_CONFLICTS[key]}")
                del alloc[key]
    for key, value in alloc.items():
        b.add(f"alloc_conf.{key}", value, "profile", f"profile {inp.prof.name}")
    return ",".join(f"{k}:{v}" for k, v in alloc.items())


def _decide_tcmalloc(b: _Builder, inp: _Inputs, u: _UiStep) -> tuple[TcmallocPlan, dict[str, str]]:
    prof = inp.prof
    tc, tc_env = _tcmalloc(inp.facts, u.ui, prof.tcmalloc)
    b.add("tcmalloc", tc.enabled, "profile" if prof.tcmalloc != "auto" else "auto", tc.reason)
    return tc, tc_env


def _decide_device_flag(b: _Builder, u: _UiStep, g: _GpuStep) -> int | None:
    """The device index the flags carry: 0 where the pin rewrites the user's device flag."""
    ui = u.ui
    if g.choice.pin_uuid and u.user_device is not None:
        if ui.device_flag_sets_visible and g.device_warning:
            pass  # the user's value names no GPU: warned above, nothing to keep or rewrite
        elif ui.device_flag_sets_visible:
            # Forge/ComfyUI turn the flag into CUDA_VISIBLE_DEVICES=<id>, replacing the UUID pin: a
            # rewritten `0` would pick CUDA's first GPU. The user's own value names the chosen GPU: keep it.
            b.add("device_flag", u.user_device, "user",
                  f"your {ui.device_flag} {u.user_device} stays: {ui.title} sets CUDA_VISIBLE_DEVICES from it, "
                  "which picks the same GPU as lowvram's pin")
        else:
            return 0  # the pinned GPU is the only one visible
    return None


def _decide_flags(b: _Builder, inp: _Inputs, u: _UiStep, settings: UiSettings) -> list[str]:
    """The UI's flags for the settings decided so far, and the profile's extra flags."""
    prof = inp.prof
    rendered = u.ui.render(settings, u.version)
    for note in rendered.notes:
        b.add("flags", None, "auto", note)
    plan_args = list(rendered.args) + [a for a in prof.args if a not in rendered.args]
    if prof.args:
        b.add("args", list(prof.args), "profile", f"extra flags from profile {prof.name}")
    u.ui.validate(plan_args, u.version)
    return plan_args


def _merge_user_flags(b: _Builder, inp: _Inputs, u: _UiStep, plan_args: list[str], *, device_index: int | None,
                      offload: str, attention: str) -> _Merge:
    """docs/architecture.md#the-policy, "Merging the user's flags"."""
    merge = "append"
    user_dropped: list[str] = []
    user_kept: list[str] = list(u.user_tokens)
    plan_dropped: list[str] = []
    if not u.user_literal:
        b.warn("your COMMANDLINE_ARGS is not a literal value ($VAR or $(...)): lowvram appends its flags "
               "and cannot check them against yours")
    elif u.user_parsed:
        plan_parsed = parse_args(plan_args, u.flagset, strict=True)
        conflicts = u.ui.cross_contradictions(u.user_parsed, plan_parsed, u.flagset)
        drop_user, drop_plan, offload, attention = _settle_conflicts(b, inp, u, conflicts, device_index=device_index,
                                                                     offload=offload, attention=attention)
        if drop_user:
            merge = "assign"
            user_dropped = [t for p in u.user_parsed if p.tokens in drop_user for t in p.tokens]
            user_kept = [t for p in u.user_parsed if p.tokens not in drop_user for t in p.tokens]
        if drop_plan:
            plan_dropped = [t for p in plan_parsed if p.tokens in drop_plan for t in p.tokens]
            plan_args = [t for p in plan_parsed if p.tokens not in drop_plan for t in p.tokens]
        b.add("merge", merge, "user" if conflicts else "auto",
              "append the plan's flags to your COMMANDLINE_ARGS at run time; their later values override your "
              + " ".join(user_dropped) if merge == "assign"
              else "append the plan's flags to your COMMANDLINE_ARGS at run time")
    return _Merge(merge, user_dropped, user_kept, plan_dropped, plan_args, offload, attention)


def _settle_conflicts(b: _Builder, inp: _Inputs, u: _UiStep, conflicts: Iterable[Contradiction], *,
                      device_index: int | None, offload: str,
                      attention: str) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]], str, str]:
    """Who wins each contradiction between the user's flags and the plan's: (user's dropped, plan's dropped,
    offload, attention)."""
    prof, overrides, ui = inp.prof, inp.overrides, u.ui
    drop_user: set[tuple[str, ...]] = set()
    drop_plan: set[tuple[str, ...]] = set()
    for c in conflicts:
        if c.first and c.first[0].split("=")[0] == ui.device_flag and device_index is not None:
            drop_user.add(c.first)
            b.warn(f"your {' '.join(c.first)} is replaced by {' '.join(c.second)}: the chosen GPU is pinned "
                   "with CUDA_VISIBLE_DEVICES, so it is device 0")
        elif overrides.explicit_profile and c.category.endswith(" value"):
            # The block appends after the user's live line and argparse keeps a flag's last value.
            drop_user.add(c.first)
            b.warn(f"your {' '.join(c.first)} contradicts the plan's {' '.join(c.second)}: profile "
                   f"{prof.name} was given explicitly, so the plan's value (after yours) wins")
        else:
            # An on/off flag cannot be switched off from the block, and the user's line is never
            # edited or frozen (issue 14): the user's flag wins, at run time.
            drop_plan.add(c.second)
            b.warn(f"your {' '.join(c.first)} contradicts the plan's {' '.join(c.second)}: kept yours and "
                   + (f"left the plan's out (an on/off flag in your COMMANDLINE_ARGS cannot be overridden; "
                      f"take {' '.join(c.first)} out of it for profile {prof.name}'s)"
                      if overrides.explicit_profile else "left the plan's out (give --profile to override yours)"))
            # The UI runs with the user's rung/backend: say so, and let the hook record that one
            # (a run on --lowvram must not teach the ladder about the plan's --medvram-sdxl).
            user_value = ui.categories.get(c.category, {}).get(c.first[0].split("=")[0])
            if c.category == "offload" and user_value:
                offload = _user_decision(b, "offload", user_value, c, offload)
            elif c.category == "attention" and user_value:
                attention = _user_decision(b, "attention", user_value, c, attention)
    return drop_user, drop_plan, offload, attention


def _decide_extensions(b: _Builder, inp: _Inputs, u: _UiStep, g: _GpuStep,
                      registry: Mapping[str, ExtensionSpec]) -> list[ExtensionSpec]:
    prof = inp.prof
    exts: list[ExtensionSpec] = []
    for name in prof.extensions:
        spec = registry.get(name)
        if spec is None:
            b.warn(f"profile {prof.name} lists extension {name!r}, which is not in lowvram's registry: skipped")
            continue
        uis = getattr(spec, "uis", ()) or ()
        if uis and u.key not in uis:
            skip = dict(getattr(spec, "skip", ()) or ())
            b.add(f"extension.{name}", "skipped", "auto", skip.get(u.key) or f"{name} does not work on {u.ui.title}")
            continue
        if g.cpu_mode and name == "vram-estimator":
            b.add(f"extension.{name}", "skipped", "auto", "VRAM Estimator benchmarks CUDA memory; there is no GPU")
            continue
        exts.append(spec)
        b.add(f"extension.{name}", "install", "profile", spec.reason or f"listed by profile {prof.name}")
    return exts


def _decide_estimate(b: _Builder, fam: str, u: _UiStep, g: _GpuStep, *, t: _Target, fits: _Fits, offload: str,
                    road: str, rungs: Sequence[str], unet: str, vae: str, attention: str) -> EstimateSummary:
    """The estimate summary, and what to try where the plan will not fit."""
    vram_total, room = g.vram_total, g.room
    fits.attention = attention  # a user's backend that won the merge counts for estimates made from here on
    fit = fits(offload) if not g.cpu_mode else None
    peak = fits.estimates[offload].peak_mb if offload in fits.estimates else None
    if peak is not None:
        b.add("estimate", peak, "auto",
              f"{fam} {t.width}×{t.height} batch {t.batch} on {offload}: peak {peak} MiB vs {vram_total} MiB − "
              f"{room} MiB headroom ({'fits' if fit else 'does not fit'} with a {int(est.DEFAULT_MARGIN * 100)} % margin)")
    elif fits.can_estimate:
        b.add("estimate", None, "auto", "the GPU's VRAM size is unknown: no estimate")
    if fit is False and road == "swap":
        b.warn(_wont_fit(fam, width=t.width, height=t.height, offload=offload, rungs=rungs, vram_total=vram_total,
                         room=room, unet=unet, vae=vae, attention=attention, ui_key=u.key, bcu=t.bcu,
                         batch=t.batch, hires=t.hires))
    return EstimateSummary(peak, fit)


def _decide_headroom(b: _Builder, inp: _Inputs, u: _UiStep, g: _GpuStep) -> None:
    """Forge's GPU Weights follow the headroom; then the headroom itself."""
    vram_total, room, facts = g.vram_total, g.room, inp.facts
    if u.key == "forge" and vram_total and not g.cpu_mode:
        weights = max(0, vram_total - room - FORGE_INFERENCE_MB)
        b.add("forge.gpu_weights_mb", weights, "auto",
              f"Forge's GPU Weights slider (Settings) follows the headroom: at most {vram_total} − {room} headroom − "
              f"{FORGE_INFERENCE_MB} inference memory; lowvram does not write Forge's settings")
    b.add("headroom_mb", room, "auto", "VRAM other programs hold (measured total − free), with the "
          f"{'Windows' if facts.system.os == 'windows' or facts.system.wsl else 'Linux'} minimum")


def _decide_env(b: _Builder, u: _UiStep, g: _GpuStep, m: _Merge, *, tc_env: Mapping[str, str], alloc_conf: str,
                hook: HookPlan, hook_config_path: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if u.ui.has_webui_user:
        merged_args = [*m.user_kept, *m.plan_args] if m.merge == "assign" else m.plan_args
        env["COMMANDLINE_ARGS"] = join_args(merged_args)
    env.update(tc_env)
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    if g.choice.pin_uuid:
        env["CUDA_VISIBLE_DEVICES"] = g.choice.pin_uuid
        b.add("cuda_visible_devices", g.choice.pin_uuid, "auto",
              "several NVIDIA GPUs: the chosen one is pinned by UUID, so it is CUDA device 0 whatever the order")
    if hook.enabled and hook_config_path:
        env["LOWVRAM_CONFIG"] = hook_config_path
    return env


def _extra(inp: _Inputs, u: _UiStep, t: _Target, fallback: str, selection: Selection | None) -> dict[str, Any]:
    prof = inp.prof
    extra: dict[str, Any] = {
        "target": {"width": t.width, "height": t.height, "batch": t.batch, "hires_scale": t.hires},
        "profile_chain": list(inp.resolved.chain),
        "ui_version": u.version,
        "flags_checked_against": u.ui.describe(u.version),
        "sysmem_fallback": fallback,
        # The hook config reads this (hookconfig.build_hook_config): the order the layout moves tensors back in.
        "layout_order": prof.layout.order,
        "layout_model_first": prof.layout.model_first,
    }
    if selection is not None:
        extra["selection"] = {"name": selection.name, "reason": selection.reason,
                              "others_matched": list(selection.others_matched)}
    return extra


def plan(
    facts: Facts,
    resolved: ResolvedProfile,
    observations: Sequence[Observation],
    overrides: Overrides,
    *,
    hook_config_path: str | None,
    webui_path: str | None,
    registry: Mapping[str, ExtensionSpec],
    family: FamilyChoice | None = None,
    selection: Selection | None = None,
    xformers_builds: Mapping[str, str] | None = None,
) -> Plan:
    """Decide everything for one WebUI, one step per setting in the order `lowvram plan` shows them;
    see docs/architecture.md#the-policy for each rule."""
    b = _Builder()
    inp = _Inputs(facts, resolved, observations, overrides, webui_path, xformers_builds)
    prof = resolved.profile
    _decide_profile(b, inp, selection)
    u = _decide_ui(b, inp)
    fam = _decide_family(b, inp, family)
    g = _decide_gpu(b, inp, u, fam)
    fallback = _decide_sysmem_fallback(b, inp)
    spill_possible = fallback == "on"
    attention = _decide_attention(b, inp, u, g)
    unet_prec, vae_prec = _decide_precision(b, inp, g)
    target = _decide_target(inp, fam)
    rungs = u.ui.rungs(fam, u.version)
    checkpoint = facts.webui.checkpoint_key if facts.webui else None
    fits = _Fits(fam, g, target, unet=unet_prec, vae=vae_prec, attention=attention, ui_key=u.key)
    rung, rung_src, rung_why = _decide_offload(b, inp, g, rungs=rungs, fits=fits,
                                               recent=_recent(observations, checkpoint), spill_possible=spill_possible)
    rung, rung_why = _map_to_ui_rung(rung, rung_why, u, g, rungs)
    road = _decide_road(b, inp, u, g, spill_possible=spill_possible, rung=rung, checkpoint=checkpoint, target=target)
    offload = _record_offload_and_road(b, (rung, rung_src, rung_why), road)
    reserve = _decide_reserve(b, inp, g, road.road, checkpoint=checkpoint, target=target)
    hook = _decide_hook(b, inp, u, reserve)
    alloc_conf = _decide_allocator(b, inp, reserve)
    tc, tc_env = _decide_tcmalloc(b, inp, u)
    device_index = _decide_device_flag(b, u, g)
    plan_args = _decide_flags(b, inp, u, UiSettings(
        offload="none" if g.foreign else offload, attention=attention,
        unet_precision="half" if g.foreign else unet_prec, vae_precision="half" if g.foreign else vae_prec,
        device_index=device_index, headroom_mb=g.room if (u.key == "comfyui" and g.gpu is not None) else None,
        family=fam))
    m = _merge_user_flags(b, inp, u, plan_args, device_index=device_index, offload=offload,
                          attention=attention)
    exts = _decide_extensions(b, inp, u, g, registry)
    estimate = _decide_estimate(b, fam, u, g, t=target, fits=fits, offload=m.offload, road=road.road, rungs=rungs,
                               unet=unet_prec, vae=vae_prec, attention=m.attention)
    _decide_headroom(b, inp, u, g)
    env = _decide_env(b, u, g, m, tc_env=tc_env, alloc_conf=alloc_conf, hook=hook,
                      hook_config_path=hook_config_path)
    gpu = g.gpu
    return Plan(
        profile=prof.name,
        ui=u.key,
        webui=webui_path,
        args=tuple(m.plan_args),
        env=env,
        tcmalloc=tc,
        extensions=tuple(exts),
        road=road.road,
        reserve=reserve,
        headroom_mb=g.room,
        hook=hook,
        estimate=estimate,
        decisions=tuple(b.decisions),
        warnings=tuple(b.warnings),
        model_family=fam,
        offload=m.offload,
        attention=m.attention,
        merge=m.merge,
        user_args_dropped=tuple(m.user_dropped),
        user_args_kept=tuple(m.user_kept) if m.merge == "assign" else (),
        plan_args_dropped=tuple(m.plan_dropped),
        gpu_index=gpu.index if gpu else None,
        gpu_uuid=gpu.uuid if gpu else None,
        extra=_extra(inp, u, target, fallback, selection),
    )


def _user_decision(b: _Builder, setting: str, value: str, c: Contradiction, planned: str) -> str:
    """Replace the plan's decision for `setting` with the user's value that wins over it."""
    for i, d in enumerate(b.decisions):
        if d.setting == setting:
            b.decisions[i] = Decision(setting, value, "user",
                                      f"your {' '.join(c.first)} stays (the plan had {planned}: {d.reason})")
            break
    return value


def join_args(args: Sequence[str]) -> str:
    """One string A1111's shlex.split reads back as `args` (single quotes where needed)."""
    return " ".join(shlex.quote(a) for a in args)


def _map_rung(rung: str, rungs: Sequence[str]) -> str:
    if rung in rungs:
        return rung
    if rung in ("medvram", "medvram-sdxl"):
        for r in ("medvram-sdxl", "medvram"):
            if r in rungs:
                return r
        return "none"  # Forge/ComfyUI swap by themselves
    if rung == "novram":
        return "lowvram"
    return rung


def _ladder(rungs: Sequence[str], fits: Any, estimates: Mapping[str, est.Estimate],
            vram_total: int | None, room: int) -> tuple[str, str]:
    if vram_total is None:
        mid = rungs[1] if len(rungs) > 1 else rungs[0]
        return mid, "the GPU's VRAM size is unknown, so no estimate: the middle rung is the safe choice"
    for rung in rungs:
        ok = fits(rung)
        if ok is None:
            mid = rungs[1] if len(rungs) > 1 else rungs[0]
            return mid, "no estimate for this model family: the middle rung is the safe choice"
        if ok:
            tried = list(rungs[: rungs.index(rung)])
            skipped = "; ".join(f"{r} needs {estimates[r].peak_mb} MiB" for r in tried)
            return rung, (f"first rung whose estimate fits: {estimates[rung].peak_mb} MiB of "
                          f"{vram_total - room} MiB usable" + (f" ({skipped})" if skipped else ""))
    last = rungs[-1]
    return last, f"no rung fits (even {last} needs {estimates[last].peak_mb} MiB): the lowest rung"


def _wont_fit(fam: str, *, width: int, height: int, offload: str, rungs: Sequence[str], vram_total: int | None,
              room: int, unet: str, vae: str, attention: str, ui_key: str, bcu: bool, batch: int,
              hires: float) -> str:
    text = f"{fam} at {width}×{height} is estimated not to fit {vram_total} MiB on {offload}"
    parts: list[str] = []
    if vram_total:
        att, off = _est_attention(attention), _est_offload(offload)
        req = est.EstimateRequest(family=fam, width=width, height=height, batch=batch,
                                  precision="full" if unet == "full" else "half",
                                  vae_precision="full" if vae == "full" else "half", attention=att, offload=off,
                                  hires_scale=hires, ui=ui_key, batch_cond_uncond=bcu)
        side = est.max_square_px(req, vram_total, room)
        if side:
            parts.append(f"a smaller size (up to about {side}×{side})")
        tiled = est.estimate(est.EstimateRequest(**{**req.__dict__, "tiled_vae": True}))
        if est.fits(tiled.peak_mb, vram_total, room):
            parts.append("tiled VAE decoding")
    lower = [r for r in rungs if rungs.index(r) > rungs.index(offload)] if offload in rungs else []
    if lower:
        parts.append(f"--offload {lower[0]}")
    if batch > 1:
        parts.append("batch 1")
    return text + (": try " + ", ".join(parts) if parts else "")


def _reserve(observations: Sequence[Observation], checkpoint: str | None, vram_total: int | None,
             gpu: GpuFacts | None, size: tuple[int, int]) -> ReservePlan:
    result = compute_reserve(observations, checkpoint=checkpoint, vram_total_mb=vram_total,
                             cuda_context_mb=est.CUDA_CONTEXT_MB, driver=gpu.driver if gpu else None, size=size)
    return ReservePlan(
        mode="auto",
        mb=int(result.reserve_mb),
        applied=True,
        free_dedicated_mb=result.free_dedicated_mb,
        overflow_mb=result.overflow_mb,
        clamped_by=result.clamped_by,
        source=result.source,
        reason=result.reason,
    )


def _tcmalloc(facts: Facts, ui: UiAdapter, wanted: str) -> tuple[TcmallocPlan, dict[str, str]]:
    tc = facts.tcmalloc
    if facts.system.os != "linux":
        return TcmallocPlan(False, None, f"TCMalloc is preloaded only on Linux ({facts.system.os} here)"), {}
    if not ui.supports_tcmalloc:
        return TcmallocPlan(False, None, f"{ui.title}'s launcher does not preload TCMalloc"), {}
    if wanted == "off":
        return TcmallocPlan(False, None, "profile turns TCMalloc off"), {"NO_TCMALLOC": "1"}
    if tc.usable and tc.library:
        return (TcmallocPlan(True, tc.library, f"preloading {tc.library} (less RAM bloat when swapping checkpoints)"),
                {"LD_PRELOAD": tc.library})
    if tc.library:
        return (TcmallocPlan(False, tc.library, f"{tc.library} is not usable ({tc.reason}): NO_TCMALLOC keeps "
                             "webui.sh from preloading it"), {"NO_TCMALLOC": "1"})
    hint = f" (install {tc.package})" if tc.package else ""
    return TcmallocPlan(False, None, f"no TCMalloc library found{hint}"), {}
