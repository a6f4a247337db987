"""The giant-kitten formula and its rounding (docs/architecture.md#the-policy, "Reserve"): pure, no I/O.

reserve = free + overflow, where `free` is the free dedicated VRAM after the model loaded
(measured before any reserve was allocated) and `overflow` the shared memory a generation spilled
into. Over the last 5 qualifying runs of this checkpoint (plus WebUI-wide manual readings) the
median `free` and the largest `overflow` are used. The result is clamped to
[0, vram_total − CUDA context] and rounded down to 64 MiB.

Shared by `reserve` (the reserve the plan lays out) and `search` (the tuning search around it), so
neither has to import the other for these primitives.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
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
    runs: tuple[Observation, ...]


def formula_inputs(observations: Iterable[Observation], checkpoint: str | None,
                   window: int = WINDOW) -> FormulaInputs:
    runs = qualifying_runs(observations, checkpoint)[-window:]
    frees = [o.free_mb for o in runs if o.free_mb is not None]
    overflows = [o.overflow_mb for o in runs if o.overflow_mb is not None]
    free = int(statistics.median(frees)) if frees else None
    overflow = max(overflows) if overflows else None
    return FormulaInputs(free, overflow, tuple(runs))


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
