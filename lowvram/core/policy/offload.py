"""The offload rung ("offload level" on screen): the CLI's, the profile's pin, or the ladder (the first
rung whose estimate fits), moved by what recent runs say (docs/architecture.md#the-policy, "Offload ladder")."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from lowvram.core.estimate import memory as est
from lowvram.core.observations import Observation, forge_knobs
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, UiStep
from lowvram.core.policy.comfy_reserve import TunedMode
from lowvram.core.policy.estimate import SPILL_TOLERANCE_MB, Fits, medvram_above_lowvram, tight_fit
from lowvram.core.policy.road_history import UNTIL_CHANGED, RunSetup, failure_text, rung_failures
from lowvram.core.words import plural
from lowvram.ui import UiSettings, adapter

SPILL_MISS_MB = 256  # overflow into shared memory that counts as a miss (docs/architecture.md#the-policy, "Offload ladder")
COMFORT_RUNS = 3  # runs with room to spare before trying one rung up
COMFORT_SHARE = 0.70  # "room to spare": peak reserved + headroom ≤ 70 % of the card
RECENT_RUNS = 10


def recent_runs(observations: Sequence[Observation], checkpoint: str | None) -> list[Observation]:
    """The latest RECENT_RUNS hook and tuning runs of this checkpoint, oldest first: what the ladder learns from."""
    runs = [o for o in observations if o.source in ("hook", "tuning")
            and (checkpoint is None or o.checkpoint in (None, checkpoint))
            and not forge_knobs(o)]  # a Forge settings probe (one that ran out of memory too) says nothing of rungs
    return sorted(runs, key=lambda o: o.time)[-RECENT_RUNS:]


def run_setup(u: UiStep, family: str, rungs: Sequence[str], *, attention: str, unet: str, vae: str) -> RunSetup:
    """The setup a failure is remembered against: the flags this plan runs with, less the offload
    level's and the device's (road_history.RunSetup). Where the user has flags of their own, the
    merge may drop plan flags the records then lack, so flags are not compared (checkpoint and
    driver still are): a failure is never forgotten for a difference lowvram cannot read."""
    base = UiSettings(attention=attention, unet_precision=unet, vae_precision=vae, family=family)
    now = u.ui.render(base, u.version).args
    offload_flags = {t for r in rungs for t in u.ui.render(replace(base, offload=r), u.version).args} - set(now)
    setup = RunSetup(ignore=frozenset(offload_flags), device_flag=u.ui.device_flag)
    return setup if u.user_tokens else replace(setup, flags=setup.strip(now))


def _missed(o: Observation, spill_possible: bool, allowed_spill_mb: int = SPILL_MISS_MB) -> bool:
    if o.ooms > 0 or (not o.ok and "oom" in o.reason.lower()):
        return True
    return bool(spill_possible and not o.layout and (o.overflow_mb or 0) > allowed_spill_mb)


def _spill_allowances(rungs: Sequence[str], fits: Fits) -> dict[str, int]:
    """The overflow a run may show before it counts as a miss, per rung: SPILL_MISS_MB, but the spill
    _faster_first accepts (up to SPILL_TOLERANCE_MB) on the medvram level it runs over the usable VRAM
    on purpose, so the planned spill does not send the next plan to --lowvram; an OOM still does."""
    above = medvram_above_lowvram(rungs)
    tight = tight_fit(fits, above) if above is not None and fits.spill_possible and fits(above) is False else None
    return {above: max(SPILL_TOLERANCE_MB, SPILL_MISS_MB)} if above is not None and tight else {}


def decide_offload(b: Builder, inp: Inputs, g: GpuStep, *, rungs: Sequence[str], fits: Fits,
                   recent: Sequence[Observation], spill_possible: bool, history: Sequence[Observation] = (),
                   setup: RunSetup | None = None, tuned: TunedMode | None = None) -> tuple[str, str, str]:
    """The offload rung before the road: (rung, source, reason). `history`: every run of this
    checkpoint on this driver (road_history), where a rung's failures are remembered until `setup` changes;
    `tuned`: ComfyUI's load mode as `lowvram tune` measured it (policy/comfy_reserve.py): only the CLI overrides it."""
    prof, overrides = inp.prof, inp.overrides
    offload_src = "auto"
    fits.spill_possible = spill_possible

    def missed(o: Observation) -> bool:  # estimates only where a run spilled more than SPILL_MISS_MB
        if not _missed(o, spill_possible):
            return False
        return _missed(o, spill_possible, _spill_allowances(rungs, fits).get(o.offload or "", SPILL_MISS_MB))

    # What ran under other flags or on another driver says nothing about this setup.
    driver = g.gpu.driver if g.gpu else None
    recent = [o for o in recent if (setup is None or setup.same(o)) and not (driver and o.driver and o.driver != driver)]
    if g.cpu_mode:
        offload, offload_why = "cpu", "no usable GPU: the UI runs on the CPU"
        if prof.offload != "cpu":
            b.warn("no usable GPU was found: planning CPU mode (slow)")
    elif g.foreign:
        offload, offload_why = "none", "no NVIDIA GPU: no offload flags"
    elif overrides.offload and overrides.offload != "auto":
        offload, offload_src, offload_why = overrides.offload, "cli", f"--offload {overrides.offload}"
    elif tuned is not None:  # measured: above a profile's pin, which guards an estimate's thin margin
        offload, offload_src, offload_why = tuned.rung, "tuning", tuned.reason
    elif prof.offload != "auto" and overrides.offload != "auto":
        offload, offload_src = prof.offload, "profile"
        offload_why = f"pinned by profile {prof.name}: the margin is too thin to trust an estimate"
        for o in recent:
            if o.offload == offload and missed(o):
                more = rungs[rungs.index(offload) + 1] if offload in rungs[:-1] else None
                b.warn(f"a recent run at offload level {offload} (pinned by profile {prof.name}) ran out of memory "
                       "or spilled: " + (f"try more offload with --offload {more}" if more else "try a smaller image"))
                break
    elif fits.streams:
        offload, offload_why = "none", _streams_by_itself(fits)
        offload_src = "cli" if overrides.offload == "auto" else "auto"
    else:
        offload, offload_why = _faster_first(_ladder(rungs, fits, fits.estimates, g.vram_total, g.room), rungs, fits)
        offload_src = "cli" if overrides.offload == "auto" else "auto"
        offload, offload_src, offload_why = _ladder_learns((offload, offload_src, offload_why), g, rungs=rungs,
                                                           recent=recent, missed=missed,
                                                           failed=lambda r: rung_failures(history, r,
                                                                                          setup or RunSetup()))
    return offload, offload_src, offload_why


def _streams_by_itself(fits: Fits) -> str:
    """Forge, ComfyUI and SD.Next load what fits of a diffusion transformer and stream the rest (STREAMING_UIS)."""
    ui = adapter(fits.ui_key)
    # Forge's --always-low-vram and ComfyUI's --lowvram load the model the same way; they only move the text
    # encoders to the CPU (text_encoder_device() in backend/memory_management.py, comfy/model_management.py).
    lowest = {"forge": " (--always-low-vram would only run the text encoders on the CPU)",
              "comfyui": " (--lowvram would only run the text encoders on the CPU)"}.get(ui.key, "")
    return (f"{ui.title} loads what fits of the model and streams the rest from RAM every step by itself: "
            f"no offload flag{lowest}; the streaming decision says how much streams and what it costs")


def _ladder_learns(ladder: tuple[str, str, str], g: GpuStep, *, rungs: Sequence[str],
                   recent: Sequence[Observation], missed: Callable[[Observation], bool],
                   failed: Callable[[str], Sequence[Observation]]) -> tuple[str, str, str]:
    """Observations move the ladder's rung: a rung whose runs failed since its last success is not
    chosen again until flags, model or driver change (`failed`); a recent miss (an OOM, a spill)
    pushes one rung down, and the ladder walks down while the rung it lands on failed or missed
    too; comfortable runs let it try one up (never onto a rung that failed)."""
    offload, offload_src, offload_why = ladder
    idx = rungs.index(offload) if offload in rungs else 0
    steps, remembered = _walk_down(rungs, idx, recent, missed, failed)
    if steps:
        idx += len(steps)
        if remembered:
            return rungs[idx], "observations", "; ".join(steps) + f"; using {rungs[idx]} {UNTIL_CHANGED}"
        offload_why = "; ".join(steps) + (": offloading one level more" if len(steps) == 1
                                          else f": offloading {len(steps)} levels more")
        return rungs[idx], "observations", offload_why
    if idx > 0:
        vram_total = g.vram_total
        here = [o for o in recent if o.offload == offload and o.peak_reserved_mb is not None]
        upper = rungs[idx - 1]
        missed_upper = any(o.offload == upper and missed(o) for o in recent) or bool(failed(upper))
        if (len(here) >= COMFORT_RUNS and vram_total and not missed_upper
                and all(not missed(o) for o in here)
                and all((o.peak_reserved_mb or 0) + g.room <= COMFORT_SHARE * vram_total for o in here)):
            return upper, "observations", (f"{len(here)} runs on {offload} had room to spare: "
                                           "trying one offload level less")
    return offload, offload_src, offload_why


def _walk_down(rungs: Sequence[str], idx: int, recent: Sequence[Observation], missed: Callable[[Observation], bool],
               failed: Callable[[str], Sequence[Observation]]) -> tuple[list[str], bool]:
    """What each rung passed on the way down said, and whether a remembered failure moved it."""
    steps: list[str] = []
    remembered = False
    while idx + 1 < len(rungs):
        rung = rungs[idx]
        failures = failed(rung)
        missed_here = [o for o in recent if o.offload == rung and missed(o)]
        if failures:
            last = failures[-1]
            at = f" at {last.width}×{last.height}" if last.width and last.height else ""
            runs = "run" if len(failures) == 1 else plural(len(failures), "run")
            oom = last.ooms > 0 or "out of memory" in failure_text(last).lower()
            steps.append(f"{rung} ran out of memory in the last {runs}{at}" if oom
                         else f"{rung} failed in the last {runs} ({failure_text(last)}{at})")
            remembered = True
        elif missed_here:
            last = missed_here[-1]
            oom = last.ooms > 0 or (not last.ok and "oom" in last.reason.lower())
            what = "ran out of memory" if oom else f"spilled {last.overflow_mb} MiB into shared memory"
            steps.append(f"a run on {rung} {what}")
        else:
            break
        idx += 1
    return steps, remembered


def _faster_first(ladder: tuple[str, str], rungs: Sequence[str], fits: Fits) -> tuple[str, str]:
    """Where the margin-fitting level is --lowvram (or lower) and the medvram level above it fits with no
    margin, or is over by a little the driver spills to RAM (estimate.tight_fit), an expert runs that
    medvram level first: --lowvram moves the UNet every step and is several times slower, and a run that
    runs out of memory moves the next plan down (_ladder_learns)."""
    rung = ladder[0]
    above = medvram_above_lowvram(rungs)
    if above is None or rung not in rungs or rungs.index(rung) < rungs.index("lowvram"):
        return ladder
    tight = tight_fit(fits, above)
    if tight is None:
        return ladder
    return above, (f"{tight}: --{above} first, since --lowvram is several times slower; "
                   "a run that runs out of memory moves to --lowvram")


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
