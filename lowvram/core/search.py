"""The reserve search giant-kitten's users do by hand (docs/architecture.md#the-policy, "Tuning", and docs/architecture.md#tune): pure functions.

giant-kitten's README: activate with reserve 0 and read the free dedicated memory, run a large
generation and read the shared overflow, then search between a little below `free` and
`free + overflow`, 2–4 steps at a time, comparing s/it and avoiding values where a small change
swings the speed. Here the observations are the measurements and this module decides what to try
next and when to stop:

- candidates lie between 0.8 × free and free + overflow, on a 64 MiB grid (the overflow read on
  runs at reserve ≤ free, `reserve_formula.overflow_inputs`: a larger reserve's own spill would
  move the range up with every candidate);
- on the resident road reserve 0 comes first (it measures free and overflow), then the formula
  (free + overflow), then a bisection around the best measured value (its nearest measured
  neighbours bound the bracket; the larger unmeasured side is split in the middle);
- the best is the fastest measured reserve that is not on a cliff (a neighbour 64 MiB away more
  than 15 % slower), so small changes in what the desktop holds do not tip it over;
- the search closes once the best has been confirmed twice (two later candidates within 128 MiB
  of it did not beat it), when nothing is left to try, or after 6 candidates (the passive search between launches;
  `lowvram tune` allows 12 per road); it reopens when the checkpoint or the driver changes, since
  observations are only counted for this checkpoint and driver;
- a run counts only for what the hook really did (`observations.measured_road`): a run planned for
  the resident road whose layout did not happen measured neither road, and one whose layout failed
  (`layout_error`) is a failed resident run at its reserve; runs are compared only with runs of the
  same size, batch and device (`observations.comparable_key`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lowvram.core.observations import Observation, comparable_key, measured_road, run_failed
from lowvram.core.reserve_formula import STEP_MB, clamp, formula_inputs, round_down, upper_bound
from lowvram.core.words import plural

PASSIVE_CANDIDATES = 6
TUNE_CANDIDATES = 12
CONFIRMATIONS = 2
CONFIRM_SPAN = 2 * STEP_MB  # a candidate this close to the best confirms it (or beats it)
SWING = 0.15  # a neighbour this much slower marks a value as swinging
LOW_FRACTION = 0.8


class Best(NamedTuple):
    road: str
    reserve_mb: int
    sit: float
    wall_s: float | None = None  # seconds per image at the runs' step count, when every probe compared had it


@dataclass(frozen=True)
class Probe:
    """Everything measured at one (road, reserve) for one checkpoint, driver and size."""

    road: str
    reserve_mb: int
    sit: float | None  # median of the successful runs
    runs: int
    ok: bool
    reason: str
    first_time: float
    unstable: bool = False
    wall_s: float | None = None  # median seconds per image at the group's step count (`wall_at`)

    def to_dict(self) -> dict[str, Any]:
        return {"road": self.road, "reserve_mb": self.reserve_mb, "sit": self.sit, "runs": self.runs,
                "ok": self.ok, "reason": self.reason, "unstable": self.unstable, "wall_s": self.wall_s}


@dataclass(frozen=True)
class TuningState:
    best: Best | None
    probes: tuple[Probe, ...]
    closed: bool
    next_candidate: int | None
    reason: str
    size: tuple[int, int] | None = None
    confirmations: int = 0
    measured_reserves: int = 0  # distinct reserves measured on the resident road (failed ones too)
    max_candidates: int = PASSIVE_CANDIDATES
    range_mb: tuple[int, int] | None = None  # [0.8 × free, free + overflow] on the 64 MiB grid
    # The best on the resident road alone: the reserve to lay out when the plan is on that road,
    # whichever road `best` names (the swap road's "reserve" means nothing to the layout).
    best_resident: Best | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": None if self.best is None else {"road": self.best.road, "reserve_mb": self.best.reserve_mb,
                                                    "sit": self.best.sit},
            "probes": [p.to_dict() for p in self.probes],
            "closed": self.closed,
            "next_candidate": self.next_candidate,
            "reason": self.reason,
            "size": None if self.size is None else {"width": self.size[0], "height": self.size[1]},
            "confirmations": self.confirmations,
            "measured_reserves": self.measured_reserves,
            "max_candidates": self.max_candidates,
            "range_mb": None if self.range_mb is None else list(self.range_mb),
            "best_resident": None if self.best_resident is None else {
                "road": self.best_resident.road, "reserve_mb": self.best_resident.reserve_mb,
                "sit": self.best_resident.sit},
        }


def round_up(mb: float, step: int = STEP_MB) -> int:
    return math.ceil(mb / step) * step


def candidate_range(free_mb: int, overflow_mb: int, *, vram_total_mb: int | None = None,
                    cuda_context_mb: int | None = None) -> tuple[int, int] | None:
    """giant-kitten's range on the 64 MiB grid: [0.8 × free, free + overflow], within the card."""
    lo = round_up(LOW_FRACTION * max(0, free_mb))
    hi = round_down(max(0, free_mb) + max(0, overflow_mb))
    cap = upper_bound(vram_total_mb, cuda_context_mb)
    if cap is not None:
        hi = min(hi, round_down(cap))
    if hi < lo:
        return None
    return (lo, hi)


def candidate_grid(free_mb: int, overflow_mb: int, **bounds: int | None) -> list[int]:
    span = candidate_range(free_mb, overflow_mb, **bounds)
    if span is None:
        return []
    return list(range(span[0], span[1] + 1, STEP_MB))


def _road(obs: Observation) -> str | None:
    """The road this run counts for: what the hook really did (None: it measured neither road).

    A resident run whose layout failed or was refused with a reason (`layout_error`) counts as a
    failed resident run; one whose layout simply did not happen measured nothing. Records from
    before roads were recorded name no road: a reserve then means the resident road.
    """
    if obs.road is None:
        return "resident" if obs.reserve_mb is not None else "swap"
    road = measured_road(obs)
    if road is None and obs.road == "resident" and run_failed(obs):
        return "resident" if obs.layout_error else None
    return road


def relevant(observations: Iterable[Observation], checkpoint: str | None, driver: str | None) -> list[Observation]:
    """Hook and tuning runs of this checkpoint and driver that measured speed or failed trying."""
    out = []
    for obs in observations:
        if obs.source not in ("hook", "tuning") or obs.checkpoint != checkpoint:
            continue
        if driver and obs.driver and obs.driver != driver:
            continue
        if obs.sit is None and not run_failed(obs):
            continue
        road = _road(obs)
        if road is None or (road == "resident" and obs.reserve_mb is None):
            continue
        out.append(obs)
    return out


def _pick(runs: Sequence[Observation], key: Any) -> Any:
    """The `key(obs)` with the most distinct resident reserves measured (the latest on a tie)."""
    groups: dict[Any, tuple[set[int], float]] = {}
    for obs in runs:
        k = key(obs)
        if k is None:
            continue
        reserves, latest = groups.get(k, (set(), 0.0))
        if _road(obs) == "resident" and obs.reserve_mb is not None:
            reserves.add(obs.reserve_mb)
        groups[k] = (reserves, max(latest, obs.time))
    if not groups:
        return None
    return max(groups, key=lambda k: (len(groups[k][0]), groups[k][1]))


def pick_size(runs: Sequence[Observation]) -> tuple[int, int] | None:
    """The size with the most distinct resident reserves measured (the latest on a tie)."""
    size: tuple[int, int] | None = _pick(runs, lambda o: o.size)
    return size


def like_with_like(runs: Sequence[Observation], size: tuple[int, int] | None = None) -> list[Observation]:
    """The runs comparable with each other (`comparable_key`: size, batch, device), at `size` when
    given: the group with the most resident reserves measured, the latest on a tie."""
    sized = [o for o in runs if o.size is not None and (size is None or o.size == size)]
    key = _pick(sized, comparable_key)
    return [o for o in sized if comparable_key(o) == key]


def wall_at(obs: Observation, steps: int | None) -> float | None:
    """Seconds per image this run would take at `steps` steps, or None where it cannot say.

    `wall_s` is the whole job per image, so it holds what s/it hides (--medvram's model moves
    before and after sampling, the VAE): at its own step count it stands as recorded; at another,
    its per-image overhead (wall_s − sit × steps) plus sit × `steps`. A record without wall_s
    (an older hook) says nothing here: the caller falls back to s/it and says so.
    """
    if obs.wall_s is None or steps is None:
        return None
    if obs.steps == steps:
        return obs.wall_s
    if obs.sit is None or not obs.steps:
        return None
    return max(0.0, obs.wall_s - obs.sit * obs.steps) + obs.sit * steps


def user_steps(runs: Sequence[Observation]) -> int | None:
    """The step count the user generates at: the latest hook run's (not a tune probe's), else the latest run's."""
    ordered = sorted((o for o in runs if o.steps), key=lambda o: o.time)
    own = [o for o in ordered if o.source == "hook" and not (o.tag or "").startswith("tune")]
    latest = (own or ordered)[-1:]
    return latest[0].steps if latest else None


def make_probes(runs: Sequence[Observation]) -> list[Probe]:
    steps = user_steps(runs)
    groups: dict[tuple[str, int], list[Observation]] = {}
    for obs in sorted(runs, key=lambda o: o.time):
        road = _road(obs)
        if road is None:
            continue
        key = (road, 0 if road == "swap" else int(obs.reserve_mb or 0))
        groups.setdefault(key, []).append(obs)
    probes = []
    for (road, reserve), items in groups.items():
        sits = [o.sit for o in items if not run_failed(o) and o.sit is not None]
        walls = [w for o in items if not run_failed(o) and (w := wall_at(o, steps)) is not None]
        failed = [o for o in items if run_failed(o)]
        reason = ""
        if failed and not sits:
            last = failed[-1]
            reason = last.reason or (f"the layout did not run: {last.layout_error}" if last.layout_error
                                     else "out of memory")
        probes.append(Probe(road, reserve, statistics.median(sits) if sits else None, len(items), bool(sits),
                            reason, items[0].time, wall_s=statistics.median(walls) if sits and walls else None))
    return _mark_unstable(probes)


def _mark_unstable(probes: list[Probe]) -> list[Probe]:
    resident = {p.reserve_mb: p for p in probes if p.road == "resident" and p.sit is not None}
    out = []
    for p in probes:
        unstable = False
        if p.road == "resident" and p.sit is not None:
            for n in (p.reserve_mb - STEP_MB, p.reserve_mb + STEP_MB):
                other = resident.get(n)
                if other is not None and other.sit is not None and other.sit > p.sit * (1 + SWING):
                    unstable = True
        out.append(Probe(p.road, p.reserve_mb, p.sit, p.runs, p.ok, p.reason, p.first_time, unstable, p.wall_s))
    return out


def by_wall(probes: Sequence[Probe]) -> bool:
    """Probes are compared on wall time per image when every one has it, else on s/it."""
    return bool(probes) and all(p.wall_s is not None for p in probes)


def best_probe(probes: Sequence[Probe], road: str | None = None) -> Probe | None:
    """The fastest successful probe, preferring ones whose neighbours do not swing the speed.

    Fastest by wall time per image where every candidate has it (s/it hides --medvram's
    once-per-image model moves, so a swap probe on --medvram can look faster than it is), else by s/it.
    """
    ok = [p for p in probes if p.sit is not None and (road is None or p.road == road)]
    if not ok:
        return None
    stable = [p for p in ok if not p.unstable] or ok
    wall = by_wall(stable)
    return min(stable, key=lambda p: ((p.wall_s if wall else p.sit) or 0.0, p.reserve_mb, p.road))


def _best(p: Probe, among: Sequence[Probe]) -> Best:
    """`p` as the Best, with its wall time per image where the probes were compared on it."""
    wall = by_wall([q for q in among if q.sit is not None])
    return Best(p.road, p.reserve_mb, float(p.sit or 0.0), p.wall_s if wall else None)


def confirmations(probes: Sequence[Probe]) -> int:
    """How many resident candidates near the current best, measured after it, failed to beat it.

    Near: within CONFIRM_SPAN of it. A slower candidate further away only narrows the bracket
    the bisection still has to search (on a curve with its optimum between the two, it is slower
    however close the optimum is), so counting it closed the search before it got near the best.
    """
    count = 0
    best_sit: float | None = None
    best_reserve = 0
    for p in sorted((p for p in probes if p.road == "resident"), key=lambda p: p.first_time):
        if p.sit is not None and (best_sit is None or p.sit < best_sit):
            best_sit, best_reserve = p.sit, p.reserve_mb
            count = 0
        elif best_sit is not None and abs(p.reserve_mb - best_reserve) <= CONFIRM_SPAN:
            count += 1
    return count


def next_candidate(measured: Iterable[int], best_reserve: int | None, grid: Sequence[int],
                   formula_mb: int | None) -> int | None:
    """What to measure next on the resident road, or None when nothing is left to try."""
    done = set(measured)
    if 0 not in done:
        return 0
    if formula_mb is not None and formula_mb not in done:
        return formula_mb
    todo = [g for g in grid if g not in done]
    if not todo:
        return None
    if best_reserve is None:
        return todo[len(todo) // 2]
    below_wall = max((m for m in done if m < best_reserve), default=-math.inf)
    above_wall = min((m for m in done if m > best_reserve), default=math.inf)
    below = [g for g in todo if below_wall < g < best_reserve]
    above = [g for g in todo if best_reserve < g < above_wall]
    if not below and not above:
        return None  # the best's neighbours on the grid are all measured: converged
    side = above if len(above) > len(below) else below
    return side[len(side) // 2]


def tuning_state(observations: Sequence[Observation], checkpoint: str | None, driver: str | None,
                 size: tuple[int, int] | None, *, max_candidates: int = PASSIVE_CANDIDATES,
                 vram_total_mb: int | None = None, cuda_context_mb: int | None = None) -> TuningState:
    """Where the search for `checkpoint` on this driver at this size stands, and what to try next."""
    runs = relevant(observations, checkpoint, driver)
    if size is None:
        size = pick_size(runs)
    if size is not None:
        runs = like_with_like(runs, size)
    probes = make_probes(runs)
    resident = [p for p in probes if p.road == "resident"]
    measured = [p.reserve_mb for p in resident]
    inputs = formula_inputs(observations, checkpoint)
    formula_mb: int | None = None
    grid: list[int] = []
    span = None
    if inputs.free_mb is not None:
        free, overflow = inputs.free_mb, inputs.overflow_mb or 0
        formula_mb = clamp(free + overflow, vram_total_mb, cuda_context_mb)[0]
        span = candidate_range(free, overflow, vram_total_mb=vram_total_mb, cuda_context_mb=cuda_context_mb)
        grid = candidate_grid(free, overflow, vram_total_mb=vram_total_mb, cuda_context_mb=cuda_context_mb)
    best_resident = best_probe(resident)
    overall = best_probe(probes)
    best = None if overall is None else _best(overall, probes)
    confirmed = confirmations(probes)
    nxt = next_candidate(measured, None if best_resident is None else best_resident.reserve_mb, grid, formula_mb)
    if not measured:
        reason = "nothing measured yet: reserve 0 first (it measures free and overflow)"
        closed = False
    elif len(measured) >= max_candidates:
        reason = f"closed after {plural(len(measured), 'candidate')}"
        closed, nxt = True, None
    elif confirmed >= CONFIRMATIONS and len(measured) >= 3:
        reason = f"closed: the best was confirmed {plural(confirmed, 'time')}"
        closed, nxt = True, None
    elif nxt is None and len(measured) >= 2:
        reason = "closed: every value next to the best has been measured"
        closed = True
    elif nxt is None:
        reason = "waiting for free/overflow measurements to bound the search"
        closed = False
    else:
        reason = f"open: {len(measured)} of {max_candidates} candidates measured, next {nxt} MiB"
        closed = False
    resident_best = (None if best_resident is None
                     else _best(best_resident, resident))
    return TuningState(best, tuple(probes), closed, nxt, reason, size, confirmed, len(measured), max_candidates,
                       span, resident_best)
