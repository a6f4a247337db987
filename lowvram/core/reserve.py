"""The layout reserve from observations (docs/architecture.md#the-policy, "Reserve"): pure, no I/O.

reserve = free + overflow, where `free` is the free dedicated VRAM after the model loaded
(measured before any reserve was allocated) and `overflow` the shared memory a generation spilled
into. giant-kitten's README asks users to read both in Task Manager; the hook measures them. Over
the last 5 qualifying runs of this checkpoint (plus WebUI-wide manual readings) the median `free`
and the largest `overflow` are used: a single low `free` reading (a browser holding VRAM) should
not shrink the reserve, while a single large spill is exactly what the reserve must cover. The
overflow is read on runs laid out at a reserve ≤ free (`reserve_formula.overflow_inputs`): above
it the layout itself pushes the model's tail into shared memory, and reading that back would
make the reserve feed on itself.
The formula itself and its rounding live in `reserve_formula` (shared with `core/search.py`, the tuning search); this module
decides between it and tuning's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lowvram.core.observations import Observation
from lowvram.core.reserve_formula import FormulaInputs, clamp, formula_inputs, laid_out, upper_bound
from lowvram.core.search import PASSIVE_CANDIDATES, TuningState, tuning_state
from lowvram.core.words import plural

__all__ = ["ReserveResult", "compute_reserve", "laid_out"]  # laid_out (reserve_formula's): policy filters records with it


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


def compute_reserve(observations: Sequence[Observation], *, checkpoint: str | None, vram_total_mb: int | None,
                    cuda_context_mb: int | None, driver: str | None = None,
                    size: tuple[int, int] | None = None, explore: bool = True,
                    max_candidates: int | None = None) -> ReserveResult:
    """The reserve for `checkpoint`: tuning's answer once it has one, else free + overflow, else 0.

    With `explore` (the passive search between launches) an open search proposes its next
    candidate; without it the best measured reserve is returned.
    """
    inputs = formula_inputs(observations, checkpoint)
    used = len(inputs.runs)
    state = tuning_state([o for o in observations if laid_out(o)], checkpoint, driver, size,
                         max_candidates=max_candidates or PASSIVE_CANDIDATES,
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
            reason = (f"tuning: {mb} MiB had the best measured speed with the model kept in VRAM ({best.sit:.3f} s/it "
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
    reason = (f"free {free} MiB (median of {inputs.free_runs}) + overflow {overflow} MiB "
              f"({_overflow_source(inputs)}) = {free + overflow} MiB")
    if formula_clamp == "vram_total":
        reason += f", clamped to the card's {upper_bound(vram_total_mb, cuda_context_mb)} MiB"
    elif formula_clamp == "zero":
        reason += ", clamped to 0"
    if formula_mb != free + overflow and formula_clamp is None:
        reason += f", rounded down to {formula_mb} MiB"
    return ReserveResult(formula_mb, inputs.free_mb, inputs.overflow_mb, "observations", formula_clamp, reason,
                         used, state, formula_mb)


def _overflow_source(inputs: FormulaInputs) -> str:
    """Which runs the overflow is of (reserve_formula.overflow_inputs: never the model the layout pushed out)."""
    if inputs.overflow_corrected:
        return (f"largest of {plural(inputs.overflow_runs, 'run')} laid out above free, less the reserve − free "
                "each pushed out of VRAM")
    text = f"largest of {inputs.overflow_runs}"
    if inputs.above_free:
        text += (f" at reserve ≤ free; {plural(inputs.above_free, 'run')} above free left out: their overflow "
                 "holds the model the layout pushed out")
    return text


def _size(size: tuple[int, int] | None) -> str:
    return f"{size[0]}×{size[1]}" if size else "an unknown size"
