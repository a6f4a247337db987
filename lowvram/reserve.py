"""The layout reserve from observations (docs/architecture.md#the-policy, "Reserve"): pure, no I/O.

reserve = free + overflow, where `free` is the free dedicated VRAM after the model loaded
(measured before any reserve was allocated) and `overflow` the shared memory a generation spilled
into. giant-kitten's README asks users to read both in Task Manager; the hook measures them. Over
the last 5 qualifying runs of this checkpoint (plus WebUI-wide manual readings) the median `free`
and the largest `overflow` are used: a single low `free` reading (a browser holding VRAM) should
not shrink the reserve, while a single large spill is exactly what the reserve must cover.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lowvram.observations import Observation, measured_road

if TYPE_CHECKING:
    from lowvram.tuning import TuningState

STEP_MB = 64
WINDOW = 5


@dataclass(frozen=True)
class ReserveResult:
    reserve_mb: int
    free_dedicated_mb: int | None
    overflow_mb: int | None
    source: str  # none | observations | tuning
    clamped_by: str | None  # None | "zero" | "vram_total"
    reason: str
    observations_used: int
    tuning: TuningState | None = None
    formula_mb: int | None = None  # free + overflow, clamped and rounded (what the formula alone says)


def round_down(mb: float, step: int = STEP_MB) -> int:
    return int(mb // step) * step


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


def laid_out(obs: Observation) -> bool:
    """False for a record planned for the resident road whose layout did not run (it failed, or
    the hook refused it): its reserve and speed say nothing about the layout. Other records
    (swap road, no road recorded) are left to their own rules."""
    return obs.road != "resident" or measured_road(obs) == "resident"


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


def compute_reserve(observations: Sequence[Observation], *, checkpoint: str | None, vram_total_mb: int | None,
                    cuda_context_mb: int | None, driver: str | None = None,
                    size: tuple[int, int] | None = None, explore: bool = True,
                    max_candidates: int | None = None) -> ReserveResult:
    """The reserve for `checkpoint`: tuning's answer once it has one, else free + overflow, else 0.

    With `explore` (the passive search between launches) an open search proposes its next
    candidate; without it the best measured reserve is returned.
    """
    from lowvram import tuning

    inputs = formula_inputs(observations, checkpoint)
    used = len(inputs.runs)
    state = tuning.tuning_state([o for o in observations if laid_out(o)], checkpoint, driver, size,
                                max_candidates=max_candidates or tuning.PASSIVE_CANDIDATES,
                                vram_total_mb=vram_total_mb, cuda_context_mb=cuda_context_mb)
    formula_mb: int | None = None
    formula_clamp: str | None = None
    if inputs.free_mb is not None or inputs.overflow_mb is not None:
        free = inputs.free_mb or 0
        overflow = inputs.overflow_mb or 0
        formula_mb, formula_clamp = clamp(free + overflow, vram_total_mb, cuda_context_mb)

    best = state.best_resident  # the reserve is for the resident road, even where the swap road ran faster
    if state.measured_reserves >= 2 and best is not None:
        if explore and not state.closed and state.next_candidate is not None:
            mb, clamped_by = clamp(state.next_candidate, vram_total_mb, cuda_context_mb)
            reason = (f"tuning: trying {mb} MiB next ({state.measured_reserves} of {state.max_candidates} "
                      f"candidates measured; best so far {best.reserve_mb} MiB at {best.sit:.3f} s/it)")
        else:
            mb, clamped_by = clamp(best.reserve_mb, vram_total_mb, cuda_context_mb)
            reason = (f"tuning: {mb} MiB had the best measured speed on the resident road ({best.sit:.3f} s/it "
                      f"at {_size(state.size)}); {state.reason}")
        return ReserveResult(mb, inputs.free_mb, inputs.overflow_mb, "tuning", clamped_by, reason, used, state,
                             formula_mb)

    if formula_mb is None:
        return ReserveResult(0, None, None, "none", None,
                             "no observations yet: reserve 0 while learning (the hook measures free and "
                             "overflow on the next run; `lowvram reserve --add` records a Task Manager reading)",
                             0, state, None)
    free = inputs.free_mb or 0
    overflow = inputs.overflow_mb or 0
    reason = (f"free {free} MiB (median of {len([o for o in inputs.runs if o.free_mb is not None])}) + overflow "
              f"{overflow} MiB (largest of {len([o for o in inputs.runs if o.overflow_mb is not None])}) "
              f"= {free + overflow} MiB")
    if formula_clamp == "vram_total":
        reason += f", clamped to the card's {upper_bound(vram_total_mb, cuda_context_mb)} MiB"
    elif formula_clamp == "zero":
        reason += ", clamped to 0"
    if formula_mb != free + overflow and formula_clamp is None:
        reason += f", rounded down to {formula_mb} MiB"
    return ReserveResult(formula_mb, inputs.free_mb, inputs.overflow_mb, "observations", formula_clamp, reason,
                         used, state, formula_mb)


def _size(size: tuple[int, int] | None) -> str:
    return f"{size[0]}×{size[1]}" if size else "an unknown size"
