"""The giant-kitten formula and its rounding (docs/architecture.md#the-policy, "Reserve"): pure, no I/O.

reserve = free + overflow, where `free` is the free dedicated VRAM after the model loaded
(measured before any reserve was allocated) and `overflow` the shared memory a generation spilled
into. Over the last 5 qualifying runs of this checkpoint (plus WebUI-wide manual readings) the
median `free` is used, and the largest `overflow` of the last 5 runs laid out at a reserve no
larger than their `free` (see `overflow_inputs`: a larger reserve pushes the model's tail into
shared memory, and that is not the generation's overflow). The result is clamped to
[0, vram_total − CUDA context] and rounded down to 64 MiB.

Shared by `reserve` (the reserve the plan lays out) and `search` (the tuning search around it), so
neither has to import the other for these primitives.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lowvram.core.observations import Observation, measured_road

STEP_MB = 64
WINDOW = 5


def round_down(mb: float, step: int = STEP_MB) -> int:
    return int(mb // step) * step


def laid_out(obs: Observation) -> bool:
    """False for a record planned for the resident road whose layout did not run (it failed, or
    the hook refused it): its reserve and speed say nothing about the layout. Other records
    (swap road, no road recorded) are left to their own rules."""
    return obs.road != "resident" or measured_road(obs) == "resident"


def qualifying_runs(observations: Iterable[Observation], checkpoint: str | None) -> list[Observation]:
    """Runs that say something about free/overflow for `checkpoint`, oldest first.

    Hook and tuning runs count when they are of this checkpoint, recorded a reserve and their
    layout really ran (the resident road: a swapped model, or a resident run whose layout failed
    or was refused, measures nothing about the layout). Manual readings count for their
    checkpoint, and WebUI-wide ones (no checkpoint) for every checkpoint.
    """
    runs = []
    for obs in observations:
        if obs.free_mb is None and obs.overflow_mb is None:
            continue
        if obs.source == "manual":
            if obs.checkpoint is not None and obs.checkpoint != checkpoint:
                continue
        elif checkpoint is None or obs.checkpoint != checkpoint or obs.reserve_mb is None or not laid_out(obs):
            continue
        runs.append(obs)
    return sorted(runs, key=lambda o: o.time)


@dataclass(frozen=True)
class FormulaInputs:
    free_mb: int | None
    overflow_mb: int | None
    runs: tuple[Observation, ...]  # every run the formula read (for free, for overflow or both), oldest first
    free_runs: int = 0  # how many `free` readings the median is of
    overflow_runs: int = 0  # how many `overflow` readings the largest is of
    # How many of the window's runs were laid out above their `free` and so left out of
    # `overflow` (or, with `overflow_corrected`, read less the model tail they pushed out).
    above_free: int = 0
    overflow_corrected: bool = False  # no run at reserve ≤ free: overflow − (reserve − free) stood in


def pushed_out(obs: Observation, free_mb: int | None) -> int:
    """MiB of the model the layout itself put in shared memory on this run: reserve − free.

    The layout allocates the reserve first and moves the model back after it, so whatever of the
    model does not fit in `free − reserve` lands in shared memory and is counted in that run's
    overflow (patches/lowvram_hook/layout.py). `free` is the run's own reading, else `free_mb`.
    """
    free = obs.free_mb if obs.free_mb is not None else free_mb
    if obs.reserve_mb is None or free is None:
        return 0
    return max(0, obs.reserve_mb - free)


def overflow_inputs(runs: Sequence[Observation], free_mb: int | None,
                    window: int = WINDOW) -> tuple[int | None, int, int, bool]:
    """The generation's own overflow: (largest, readings, runs left out, corrected).

    A run laid out at a reserve r above its `free` reports the model tail the layout pushed
    into shared memory (≈ r − free) on top of what the generation spilled, and more (δ: the
    allocator's slack around the reserve block, working memory that no longer fits beside the
    tail). Fed back into free + overflow that gives r + δ, the next launch lays out there, and
    the reserve walks up launch after launch (2560 → 2624 → 2688) instead of settling.

    So the overflow is read where giant-kitten's recipe reads it: on runs whose reserve left the
    model resident (reserve ≤ their own `free`: reserve 0, which the search always measures
    first, a candidate below `free`, a `reserve --add` reading), the last `window` of them. That
    is chosen over subtracting r − free from every run because subtracting leaves δ in (the
    reserve then settles δ too high) and reads too little where the tail takes the place of
    spill rather than adding to it (a reserve between free and the working set). Only where no
    run at reserve ≤ free exists (a reserve forced from the first launch) do the runs above it
    stand in, each less its own r − free: an approximation, never more than they measured.
    Both the formula and the search's candidate range use this figure.
    """
    at_free = [o for o in runs if pushed_out(o, free_mb) == 0][-window:]
    above = [o for o in runs[-window:] if pushed_out(o, free_mb) > 0 and o.overflow_mb is not None]
    readings = [o.overflow_mb for o in at_free if o.overflow_mb is not None]
    if readings:
        return max(readings), len(readings), len(above), False
    corrected = [max(0, o.overflow_mb - pushed_out(o, free_mb)) for o in above if o.overflow_mb is not None]
    if corrected:
        return max(corrected), len(corrected), len(above), True
    return None, 0, 0, False


def formula_inputs(observations: Iterable[Observation], checkpoint: str | None,
                   window: int = WINDOW) -> FormulaInputs:
    qualifying = qualifying_runs(observations, checkpoint)
    runs = qualifying[-window:]
    frees = [o.free_mb for o in runs if o.free_mb is not None]
    free = int(statistics.median(frees)) if frees else None
    overflow, readings, above, corrected = overflow_inputs(qualifying, free, window)
    at_free = [] if corrected else [o for o in qualifying if pushed_out(o, free) == 0][-window:]
    used = sorted({id(o): o for o in [*runs, *at_free]}.values(), key=lambda o: o.time)
    return FormulaInputs(free, overflow, tuple(used), len(frees), readings, above, corrected)


def upper_bound(vram_total_mb: int | None, cuda_context_mb: int | None) -> int | None:
    """vram_total − CUDA context; an unknown context counts as 0, an unknown total skips the bound."""
    if vram_total_mb is None:
        return None
    return max(0, vram_total_mb - (cuda_context_mb or 0))


def clamp(mb: int, vram_total_mb: int | None, cuda_context_mb: int | None) -> tuple[int, str | None]:
    """Clamp to [0, vram_total − context] and round down to 64 MiB; name the bound that cut it."""
    clamped_by = None
    if mb < 0:
        mb, clamped_by = 0, "zero"
    hi = upper_bound(vram_total_mb, cuda_context_mb)
    if hi is not None and mb > hi:
        mb, clamped_by = hi, "vram_total"
    return round_down(mb), clamped_by
