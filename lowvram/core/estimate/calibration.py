"""Fit the estimator's free coefficients to what this install measured.

Two sources, both parsed data handed in by the caller (this module does no I/O):
- the hook's observations (lowvram.core.observations.Observation): absolute `torch.cuda` peaks of real
  generations, with the flags, offload mode, size and batch they ran with;
- VRAM Estimator's `stats.json`: `reserved_peak` deltas over a baseline taken with the model
  loaded, from its 1-step benchmark (extensions.md §3–§4).

Only the scales the physics cannot know are fitted: the UNet's and the VAE's working memory
(`act_scale`, `vae_scale`), other tensors this install keeps on the GPU (`extra_mb`), and the
allocator's slack. The model's form stays, so a calibration from 512–768 px benchmarks still
extrapolates sanely to 1024 px (VRAM Estimator's cubics do not). The calibration reports its error
on the data it used; the policy uses that error as the `fits` margin.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lowvram.core.estimate.memory import (
    DEFAULT_COEFFICIENTS,
    DEFAULT_MARGIN,
    MIB,
    Coefficients,
    EstimateRequest,
    PhaseTerms,
    effective_offload,
    phase_terms,
)
from lowvram.core.estimate.memory import (
    UIS as _UIS,
)
from lowvram.core.observations import Observation

STATS_KEYS = ("txt2img", "txt2img_hr", "txt2img_hr_latent", "img2img")
MIN_MARGIN = 0.05
MAX_MARGIN = 0.30
_SCALE_RANGE = (0.35, 3.0)


@dataclass(frozen=True)
class StatsRecord:
    """One VRAM Estimator benchmark point (MiB deltas over its baseline)."""

    op: str  # txt2img | txt2img_hr | txt2img_hr_latent | img2img
    width: int  # final side of the square image
    batch: int
    reserved_peak_mb: float
    active_peak_mb: float | None = None


@dataclass(frozen=True)
class StatsData:
    records: tuple[StatsRecord, ...]
    skipped: tuple[str, ...]  # one line per record or section that did not parse


@dataclass(frozen=True)
class Calibration:
    """Fitted coefficients and how well they reproduce the data they were fitted on."""

    coefficients: Coefficients = DEFAULT_COEFFICIENTS
    error: float = DEFAULT_MARGIN  # the margin to use in fits(): the fit's 90th-percentile relative error
    median_error: float | None = None  # on the data used, after fitting
    max_error: float | None = None
    default_median_error: float | None = None  # the uncalibrated model's median error on the same data
    points: int = 0
    observations: int = 0
    stats_points: int = 0
    source: str = "reference"  # reference | observations | stats.json | observations+stats.json
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> dict[str, object]:
        co = self.coefficients
        return {
            "source": self.source,
            "points": self.points,
            "observations": self.observations,
            "stats_points": self.stats_points,
            "margin": round(self.error, 3),
            "median_error": None if self.median_error is None else round(self.median_error, 3),
            "max_error": None if self.max_error is None else round(self.max_error, 3),
            "default_median_error": None if self.default_median_error is None else round(self.default_median_error, 3),
            "act_scale": round(co.act_scale, 3),
            "vae_scale": round(co.vae_scale, 3),
            "extra_mb": round(co.extra_mb),
            "slack_working": round(co.slack_working, 3),
            "skipped": list(self.skipped),
        }


DEFAULT_CALIBRATION = Calibration()


# --------------------------------------------------------------------------- stats.json


def _record(op: str, index: int, raw: object) -> StatsRecord | str:
    where = f"{op}[{index}]"
    if not isinstance(raw, dict):
        return f"{where}: not an object"
    width, batch, reserved = raw.get("width"), raw.get("batch_size"), raw.get("reserved_peak")
    if isinstance(width, bool) or not isinstance(width, int) or not 8 <= width <= 16384:
        return f"{where}: bad width {width!r}"
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 256:
        return f"{where}: bad batch_size {batch!r}"
    if isinstance(reserved, bool) or not isinstance(reserved, (int, float)) or not 0 <= reserved < 1e7:
        return f"{where}: bad reserved_peak {reserved!r}"
    active = raw.get("active_peak")
    active_mb = float(active) if isinstance(active, (int, float)) and not isinstance(active, bool) else None
    return StatsRecord(op, width, batch, float(reserved), active_mb)


def _salvage_array(text: str, key: str) -> tuple[list[object], bool]:
    """Decode the records of `"key": [...]` one object at a time, stopping where the text breaks."""
    marker = f'"{key}"'
    pos = text.find(marker)
    if pos < 0:
        return [], False
    pos = text.find("[", pos + len(marker))
    if pos < 0:
        return [], True
    decoder = json.JSONDecoder()
    items: list[object] = []
    i = pos + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            return items, True  # truncated inside the array
        if text[i] == "]":
            return items, False
        try:
            obj, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):  # broken JSON, a number over Python's digit limit, absurd nesting
            return items, True
        items.append(obj)


def parse_stats(text: str) -> StatsData:
    """Parse VRAM Estimator's stats.json; a partial or corrupt file yields what parses, and says what not.

    The extension rewrites the file after every run without a temp file, so an interrupted
    benchmark can leave it truncated mid-record; its own loader then refuses the whole file.
    """
    records: list[StatsRecord] = []
    skipped: list[str] = []
    text = text.removeprefix("\ufeff")
    data: Any
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        skipped.append(f"not valid JSON ({exc.msg} at line {exc.lineno}); kept the records before the break")
        data = None
    except (ValueError, RecursionError) as exc:  # a number over Python's digit limit, absurd nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:60]
        skipped.append(f"not usable JSON ({reason}); kept the records before the break")
        data = None
    if data is not None and not isinstance(data, dict):
        return StatsData((), (f"top level is {type(data).__name__}, not an object",))
    for op in STATS_KEYS:
        if data is not None:
            raw = data.get(op)
            if raw is None:
                skipped.append(f"{op}: missing")
                continue
            if not isinstance(raw, list):
                skipped.append(f"{op}: not a list")
                continue
            items: list[object] = raw
        else:
            items, broken = _salvage_array(text, op)
            if broken:
                skipped.append(f"{op}: cut off after {len(items)} records")
            elif not items and f'"{op}"' not in text:
                skipped.append(f"{op}: missing")
        for n, item in enumerate(items):
            rec = _record(op, n, item)
            if isinstance(rec, str):
                skipped.append(rec)
            else:
                records.append(rec)
    return StatsData(tuple(records), tuple(skipped))


# --------------------------------------------------------------------------- observations

_ATTENTION_FLAGS = {
    "--xformers": "xformers",
    "--force-enable-xformers": "xformers",
    "--opt-sdp-attention": "sdp",
    "--opt-sdp-no-mem-attention": "sdp",
    "--opt-sub-quad-attention": "sub-quad",
    "--opt-split-attention": "split",
    "--opt-split-attention-v1": "split",
    "--opt-split-attention-invokeai": "split",
    "--disable-opt-split-attention": "none",
}


def request_for_flags(template: EstimateRequest, flags: Sequence[str], offload: str | None = None) -> EstimateRequest:
    """The request an observation ran as: the template with what its UI flags say.

    A1111 without an attention flag picks Doggettx's split attention (its highest-priority
    backend that needs no flag), so on A1111 no flag means `split`.
    """
    attention = "split" if template.ui == "a1111" else template.attention
    precision, vae_precision = template.precision, template.vae_precision
    mode = None
    flag_list = list(flags)
    for i, flag in enumerate(flag_list):
        if flag in _ATTENTION_FLAGS:
            attention = _ATTENTION_FLAGS[flag]
        elif flag == "--no-half":
            precision = vae_precision = "full"
        elif flag == "--no-half-vae":
            vae_precision = "full"
        elif flag == "--precision" and i + 1 < len(flag_list) and flag_list[i + 1] == "full":
            precision = vae_precision = "full"
        elif flag in ("--lowvram", "--medvram", "--medvram-sdxl"):
            mode = flag[2:] if mode != "lowvram" else mode
        elif flag in ("--always-low-vram", "--novram", "--always-no-vram"):
            mode = "lowvram"
    if offload in ("none", "medvram-sdxl", "medvram", "lowvram"):
        mode = offload
    return replace(
        template,
        attention=attention,
        precision=precision,
        vae_precision=vae_precision,
        offload=mode or "none",
    )


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class _Point:
    phases: tuple[PhaseTerms, ...]
    measured: float  # bytes
    baseline: float  # bytes subtracted from the prediction (stats.json deltas)
    absolute: bool  # an absolute torch peak (observations) vs a delta (stats.json)
    reserved: bool  # the measurement is reserved memory: add the allocator's slack to the prediction
    label: str


def _predict(p: _Point, co: Coefficients, act: float, vae: float, extra: float) -> float:
    best = max(p.phases, key=lambda t: t.torch_bytes(act, vae, extra))
    torch_bytes = best.torch_bytes(act, vae, extra)
    if p.reserved:
        r = best.resident
        weights = r.unet + r.text + r.vae
        torch_bytes += co.slack_weights * weights + co.slack_working * max(0.0, torch_bytes - weights)
    return torch_bytes - p.baseline


def _stats_point(template: EstimateRequest, rec: StatsRecord, co: Coefficients) -> _Point:
    hr = rec.op in ("txt2img_hr", "txt2img_hr_latent")
    side = max(8, rec.width // 2) if hr else rec.width
    req = replace(template, width=side, height=side, batch=rec.batch, hires_scale=2.0 if hr else 1.0, tiled_vae=False)
    phases = phase_terms(req, co)
    # The baseline is taken with the model loaded: weights that stay resident are in it already.
    offload = effective_offload(req.family, req.offload)
    baseline = 0.0
    if offload == "none" and req.ui == "a1111":
        r = phases["sampling"].resident
        baseline = r.unet + r.text + r.vae
    return _Point(tuple(phases.values()), rec.reserved_peak_mb * MIB, baseline, False, True, f"stats {rec.op} {rec.width}px b{rec.batch}")


def _observation_point(template: EstimateRequest, obs: Observation, co: Coefficients) -> _Point | str:
    if obs.source != "hook":
        return "not a hook measurement"
    if not obs.ok or obs.ooms:
        return "an OOM or failed run"
    if not obs.peak_allocated_mb or obs.peak_allocated_mb <= 0:
        return "no peak recorded"
    if not obs.width or not obs.height or not obs.batch:
        return "no size or batch recorded"
    if obs.family and obs.family != template.family:
        return f"another model family ({obs.family})"
    ui = _LINEAGE.get(obs.ui or "", obs.ui or "")  # another UI's run (issue 19 item 5) is estimated as it ran
    if ui and ui != template.ui and ui in _UIS:
        template = replace(template, ui=ui)
    try:
        req = request_for_flags(
            replace(template, width=obs.width, height=obs.height, batch=obs.batch, hires_scale=1.0),
            obs.flags,
            obs.offload,
        )
        phases = phase_terms(req, co)
    except Exception as exc:  # a record the model cannot describe: skip it, keep the rest
        return f"unusable ({exc})"
    return _Point(tuple(phases.values()), obs.peak_allocated_mb * MIB, 0.0, True, False, f"obs {obs.width}x{obs.height} b{obs.batch}")


def _errors(points: Sequence[_Point], co: Coefficients, act: float, vae: float, extra: float) -> list[float]:
    out = []
    for p in points:
        pred = _predict(p, co, act, vae, extra)
        out.append(abs(pred - p.measured) / max(p.measured, 64 * MIB))
    return out


def _log_grid(lo: float, hi: float, n: int) -> list[float]:
    a, b = math.log(lo), math.log(hi)
    return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]


def _fit_scales(points: Sequence[_Point], co: Coefficients) -> tuple[float, float, float]:
    """(act_scale, vae_scale, extra bytes): a coarse-to-fine grid on log scales, weakly pulled to 1."""
    absolute = [p for p in points if p.absolute]

    def extra_for(act: float, vae: float) -> float:
        if len(absolute) < 3:
            return co.extra_mb * MIB
        resid = [p.measured - _predict(p, co, act, vae, 0.0) for p in absolute]
        return max(-2048.0 * MIB, min(4096.0 * MIB, statistics.median(resid)))

    def loss(act: float, vae: float) -> tuple[float, float]:
        extra = extra_for(act, vae)
        total = 0.0
        for p in points:
            pred = max(_predict(p, co, act, vae, extra), 1.0)
            total += math.log(pred / max(p.measured, 1.0)) ** 2
        prior = 0.001 * (math.log(act) ** 2 + math.log(vae) ** 2)
        return total / len(points) + prior, extra

    best = (math.inf, 1.0, 1.0, co.extra_mb * MIB)
    lo, hi = _SCALE_RANGE
    grid = _log_grid(lo, hi, 21)
    for a in grid:
        for v in grid:
            value, extra = loss(a, v)
            if value < best[0]:
                best = (value, a, v, extra)
    # Pattern search from the best grid point, shrinking the step: the valley along the
    # scale/extra trade-off is narrow, a grid alone misses its floor.
    step = 1.12
    while step > 1.001:
        moved = False
        for da, dv in ((step, 1.0), (1 / step, 1.0), (1.0, step), (1.0, 1 / step),
                       (step, step), (1 / step, 1 / step), (step, 1 / step), (1 / step, step)):
            a, v = best[1] * da, best[2] * dv
            if not (lo <= a <= hi and lo <= v <= hi):
                continue
            value, extra = loss(a, v)
            if value < best[0] - 1e-12:
                best = (value, a, v, extra)
                moved = True
        if not moved:
            step = math.sqrt(step)
    return best[1], best[2], best[3]


def _fit_slack(template: EstimateRequest, observations: Iterable[Observation], co: Coefficients) -> float:
    """The allocator's slack on working memory, from runs that recorded both peaks."""
    ratios = []
    for obs in observations:
        if obs.source != "hook" or not obs.peak_allocated_mb or not obs.peak_reserved_mb or obs.ooms:
            continue
        if not obs.width or not obs.height or not obs.batch:
            continue
        if obs.family and obs.family != template.family:
            continue
        try:
            req = request_for_flags(replace(template, width=obs.width, height=obs.height, batch=obs.batch), obs.flags, obs.offload)
            phases = phase_terms(req, co)
        except Exception:
            continue
        best = max(phases.values(), key=lambda t: t.torch_bytes(co.act_scale, co.vae_scale, 0.0))
        working = sum(best.unet.values()) * co.act_scale + sum(best.vae.values()) * co.vae_scale
        if working > 32 * MIB:
            ratios.append((obs.peak_reserved_mb - obs.peak_allocated_mb) * MIB / working)
    if len(ratios) < 2:
        return co.slack_working
    return max(0.0, min(1.0, statistics.median(ratios)))


def calibrate(
    template: EstimateRequest,
    observations: Iterable[Observation] = (),
    stats: StatsData | None = None,
    base: Coefficients = DEFAULT_COEFFICIENTS,
) -> Calibration:
    """Fit the free coefficients for `template`'s family and UI to this install's data.

    `template` carries the family, UI, precision, attention and offload the data ran with where
    the data itself does not say (stats.json never does; observations carry their flags).
    """
    obs_list = list(observations)
    skipped: list[str] = list(stats.skipped) if stats else []
    points: list[_Point] = []
    n_obs = n_stats = 0
    for n, obs in enumerate(obs_list):
        pt = _observation_point(template, obs, base)
        if isinstance(pt, str):
            skipped.append(f"observation {n + 1}: {pt}")
        else:
            points.append(pt)
            n_obs += 1
    if stats:
        for rec in stats.records:
            if rec.reserved_peak_mb <= 0:
                skipped.append(f"stats {rec.op} {rec.width}px b{rec.batch}: zero delta")
                continue
            points.append(_stats_point(template, rec, base))
            n_stats += 1
    if not points:
        return Calibration(coefficients=base, skipped=tuple(skipped))

    co = replace(base, slack_working=_fit_slack(template, obs_list, base))
    default_errors = _errors(points, co, base.act_scale, base.vae_scale, base.extra_mb * MIB)
    act, vae, extra = _fit_scales(points, co)
    co = replace(co, act_scale=act, vae_scale=vae, extra_mb=extra / MIB)
    errs = sorted(_errors(points, co, act, vae, extra))
    p90 = errs[min(len(errs) - 1, math.ceil(0.9 * len(errs)) - 1)]
    # Few points say little about the error elsewhere: never trust a margin below the default then.
    floor = MIN_MARGIN if len(points) >= 8 else DEFAULT_MARGIN
    source = "+".join(s for s, n in (("observations", n_obs), ("stats.json", n_stats)) if n)
    return Calibration(
        coefficients=co,
        error=max(floor, min(MAX_MARGIN, p90)),
        median_error=statistics.median(errs),
        max_error=errs[-1],
        default_median_error=statistics.median(default_errors),
        points=len(points),
        observations=n_obs,
        stats_points=n_stats,
        source=source,
        skipped=tuple(skipped),
    )


# --------------------------------------------------------------------------- other UIs' runs (issue 19 item 5)

MAX_MEASURED_SCALE = 2.0  # evidence may double an estimate, no more: a run elsewhere is not this run
_LINEAGE = {"forge-neo": "forge", "reforge": "forge"}


@dataclass(frozen=True)
class MeasuredScale:
    """How much more than the estimator says this model needs on this card, by runs of it in other UIs."""

    scale: float = 1.0  # >= 1: the estimate times this; 1.0 = the runs agree with the estimate (or none)
    ooms: int = 0  # runs that ran out of memory
    peaks: int = 0  # runs that recorded a peak


def measured_scale(template: EstimateRequest, runs: Iterable[Observation], *, usable_mb: int | None,
                   room_mb: int) -> MeasuredScale:
    """Each run is estimated as it ran (its UI, flags, offload level, size and batch): a run that ran out of
    memory needed more than its card's usable VRAM, a run's peak is what it needed. The scale is the most the
    OOMs say at least, or the median measured/estimated peak, whichever is larger, never below 1 (evidence
    from another UI makes a plan more careful, never less) nor over MAX_MEASURED_SCALE."""
    from lowvram.core.estimate.memory import UIS, estimate
    from lowvram.core.observations import oom_run

    oom_ratios: list[float] = []
    peak_ratios: list[float] = []
    for obs in runs:
        if not obs.width or not obs.height:
            continue
        ui = _LINEAGE.get(obs.ui or "", obs.ui or "")
        try:
            req = request_for_flags(replace(template, width=obs.width, height=obs.height, batch=obs.batch or 1,
                                            hires_scale=1.0, ui=ui if ui in UIS else template.ui),
                                    obs.flags, obs.offload)
            e = estimate(req)
        except Exception:  # a record the model cannot describe: skip it, keep the rest
            continue
        total = obs.vram_total_mb or usable_mb
        if oom_run(obs) and total and e.peak_mb > 0:
            oom_ratios.append((total - room_mb if obs.vram_total_mb else total) / e.peak_mb)
        elif obs.ok and obs.peak_allocated_mb and e.torch_peak_mb > 0:
            peak_ratios.append(obs.peak_allocated_mb / e.torch_peak_mb)
    scale = max([1.0, *oom_ratios, statistics.median(peak_ratios) if peak_ratios else 1.0])
    return MeasuredScale(min(MAX_MEASURED_SCALE, scale), len(oom_ratios), len(peak_ratios))
