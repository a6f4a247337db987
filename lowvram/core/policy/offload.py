"""The offload rung ("offload level" on screen): the CLI's, the profile's pin, or the ladder (the first
rung whose estimate fits), moved by what recent runs say (docs/architecture.md#the-policy, "Offload ladder")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lowvram.core.estimate import memory as est
from lowvram.core.observations import Observation
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, UiStep
from lowvram.core.policy.estimate import Fits

SPILL_MISS_MB = 256  # overflow into shared memory that counts as a miss (docs/architecture.md#the-policy, "Offload ladder")
COMFORT_RUNS = 3  # runs with room to spare before trying one rung up
COMFORT_SHARE = 0.70  # "room to spare": peak reserved + headroom ≤ 70 % of the card
RECENT_RUNS = 10


def recent_runs(observations: Sequence[Observation], checkpoint: str | None) -> list[Observation]:
    """The latest RECENT_RUNS hook and tuning runs of this checkpoint, oldest first: what the ladder learns from."""
    runs = [o for o in observations if o.source in ("hook", "tuning")
            and (checkpoint is None or o.checkpoint in (None, checkpoint))]
    return sorted(runs, key=lambda o: o.time)[-RECENT_RUNS:]


def _missed(o: Observation, spill_possible: bool) -> bool:
    if o.ooms > 0 or (not o.ok and "oom" in o.reason.lower()):
        return True
    return bool(spill_possible and not o.layout and (o.overflow_mb or 0) > SPILL_MISS_MB)


def decide_offload(b: Builder, inp: Inputs, g: GpuStep, *, rungs: Sequence[str], fits: Fits,
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
                more = rungs[rungs.index(offload) + 1] if offload in rungs[:-1] else None
                b.warn(f"a recent run at offload level {offload} (pinned by profile {prof.name}) ran out of memory "
                       "or spilled: " + (f"try more offload with --offload {more}" if more else "try a smaller image"))
                break
    else:
        offload, offload_why = _ladder(rungs, fits, fits.estimates, g.vram_total, g.room)
        offload_src = "cli" if overrides.offload == "auto" else "auto"
        offload, offload_src, offload_why = _ladder_learns((offload, offload_src, offload_why), g, rungs=rungs,
                                                           recent=recent, spill_possible=spill_possible)
    return offload, offload_src, offload_why


def _ladder_learns(ladder: tuple[str, str, str], g: GpuStep, *, rungs: Sequence[str],
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
        offload_why = "; ".join(steps) + (": offloading one level more" if len(steps) == 1
                                          else f": offloading {len(steps)} levels more")
        return rungs[idx], "observations", offload_why
    if idx > 0:
        vram_total = g.vram_total
        here = [o for o in recent if o.offload == offload and o.peak_reserved_mb is not None]
        upper = rungs[idx - 1]
        missed_upper = any(o.offload == upper and _missed(o, spill_possible) for o in recent)
        if (len(here) >= COMFORT_RUNS and vram_total and not missed_upper
                and all(not _missed(o, spill_possible) for o in here)
                and all((o.peak_reserved_mb or 0) + g.room <= COMFORT_SHARE * vram_total for o in here)):
            return upper, "observations", (f"{len(here)} runs on {offload} had room to spare: "
                                           "trying one offload level less")
    return offload, offload_src, offload_why


def _ladder(rungs: Sequence[str], fits: Any, estimates: Mapping[str, est.Estimate],
            vram_total: int | None, room: int) -> tuple[str, str]:
    if vram_total is None:
        mid = rungs[1] if len(rungs) > 1 else rungs[0]
        return mid, "the GPU's VRAM size is unknown, so no estimate: the middle offload level is the safe choice"
    for rung in rungs:
        ok = fits(rung)
        if ok is None:
            mid = rungs[1] if len(rungs) > 1 else rungs[0]
            return mid, "no estimate for this model family: the middle offload level is the safe choice"
        if ok:
            tried = list(rungs[: rungs.index(rung)])
            skipped = "; ".join(f"{r} needs {estimates[r].peak_mb} MiB" for r in tried)
            return rung, (f"the least offload whose estimate fits: {estimates[rung].peak_mb} MiB of "
                          f"{vram_total - room} MiB usable" + (f" ({skipped})" if skipped else ""))
    last = rungs[-1]
    return last, f"no offload level fits (even {last} needs {estimates[last].peak_mb} MiB): the most offload there is"


def map_to_ui_rung(offload: str, offload_why: str, u: UiStep, g: GpuStep, rungs: Sequence[str]) -> tuple[str, str]:
    """A rung this UI does not have becomes its nearest one, and the reason says so."""
    mapped = map_rung(offload, rungs)
    if offload not in ("cpu", "none") and offload not in rungs and not g.foreign and mapped != offload:
        offload_why += f" ({u.ui.title} has no {offload}; its nearest offload level is {mapped})"
        offload = mapped
    return offload, offload_why


def map_rung(rung: str, rungs: Sequence[str]) -> str:
    """The UI's nearest rung to `rung` (doctor maps a pinned rung the same way)."""
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
