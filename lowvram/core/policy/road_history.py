"""What recorded runs say about the two roads: which road's last run failed, and which was faster
measured like with like (docs/architecture.md#the-policy, "Two roads")."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from lowvram.core.observations import Observation, comparable_key, forge_knobs, measured_road, run_failed
from lowvram.core.policy.builder import RoadChoice
from lowvram.core.words import RESIDENT, SWAP, plural, road_words

ROAD_WINDOW = 5  # the latest measurements per road in one comparable group
FAILURE_TEXT = 80  # how much of a recorded failure reason the road's reason quotes
NO_WALL = "older records have no wall time per image, which would count --medvram's model moves"


UNTIL_CHANGED = "until flags, model or driver change"


@dataclass(frozen=True)
class RunSetup:
    """What a failure is remembered against, besides the checkpoint and the driver (`road_history`
    keeps only runs of this checkpoint on this driver): the flags the plan runs with now, less the
    offload level's and the device's (offload.run_setup).

    A failed run under other flags says nothing about this setup; `flags` None (or a run that
    recorded no flags) compares as the same.
    """

    flags: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()  # the offload levels' flags
    device_flag: str | None = None

    def strip(self, flags: Sequence[str]) -> frozenset[str]:
        out: set[str] = set()
        skip = False
        for token in flags:
            if skip:
                skip = False
            elif self.device_flag and token == self.device_flag:
                skip = True
            elif token not in self.ignore and not (self.device_flag and token.startswith(self.device_flag + "=")):
                out.add(token)
        return frozenset(out)

    def same(self, o: Observation) -> bool:
        return self.flags is None or not o.flags or self.strip(o.flags) == self.flags


def road_history(observations: Sequence[Observation], checkpoint: str | None,
                 driver: str | None) -> list[Observation]:
    """Hook and tuning runs of this checkpoint on this driver (where both are known), oldest first.

    All of them, not only the last RECENT_RUNS: a road's last failure must not age out behind
    runs on the other road, and the comparison looks for its own size and device among them.
    """
    runs = [o for o in observations if o.source in ("hook", "tuning")
            and (checkpoint is None or o.checkpoint in (None, checkpoint))
            and not (driver and o.driver and o.driver != driver) and not forge_knobs(o)]
    return sorted(runs, key=lambda o: o.time)


def _is_probe(o: Observation) -> bool:
    """A run of `lowvram tune` (its saved probe, or a hook record tagged with tune's run tag)."""
    return o.source == "tuning" or (o.tag or "").startswith("tune")


def _road_failure(o: Observation, road: str, rung: str, setup: RunSetup) -> bool | None:
    """What run `o` says about `road` (the swap road on `rung`): True failed, False worked, None nothing.

    The swap road is the run's offload rung: a run on another rung is another swap road (the
    ladder moves off a rung that ran out of memory). A tune probe on the resident road that failed
    with its layout in place failed at that reserve (tune tries reserves that may not fit), not
    the road; one whose layout failed or was refused did fail the road.
    """
    if o.road != road or (road == "swap" and o.offload != rung):
        return None
    if run_failed(o):
        if (road == "resident" and _is_probe(o) and not o.layout_error) or not setup.same(o):
            return None
        return True
    return False if measured_road(o) == road else None


def last_failures(history: Sequence[Observation], rung: str,
                  setup: RunSetup | None = None) -> dict[str, Observation]:
    """The roads whose latest run (that said anything about the road) failed under this setup, with that run."""
    failed: dict[str, Observation] = {}
    for road in ("swap", "resident"):
        for o in reversed(history):
            verdict = _road_failure(o, road, rung, setup or RunSetup())
            if verdict is not None:
                if verdict:
                    failed[road] = o
                break
    return failed


def rung_failures(history: Sequence[Observation], rung: str, setup: RunSetup) -> list[Observation]:
    """The runs swapping on `rung` that failed since its last success there, under this setup (oldest first)."""
    streak: list[Observation] = []
    for o in history:
        if o.road == "resident" or o.offload != rung:
            continue
        if run_failed(o):
            if setup.same(o):
                streak.append(o)
        else:
            streak = []
    return streak


def failure_text(o: Observation) -> str:
    """The recorded reason, short: the layout's error, else the job's reason."""
    if o.layout_error:
        text = f"layout failed: {o.layout_error}"
    elif o.reason:
        text = o.reason
    else:
        text = "out of memory" if o.ooms else "the job failed"
    text = " ".join(text.split())
    return text if len(text) <= FAILURE_TEXT else text[:FAILURE_TEXT - 1].rstrip() + "…"


def avoid_failed(failed: Mapping[str, Observation], rung: str) -> RoadChoice:
    """Never pick a road whose last run failed; with both failed, the safer swap road, warned."""
    swap, res = failed.get("swap"), failed.get("resident")
    if swap is not None and res is not None:
        both = f"swap with offload {rung}: {failure_text(swap)}; resident: {failure_text(res)}"
        return RoadChoice("swap", "observations", f"{SWAP}, the safer way: the last runs both ways failed ({both})",
                          f"the last runs both ways failed ({both}): planned to {SWAP}; the UI's console says more")
    if res is not None:
        return RoadChoice("swap", "observations", f"{SWAP}: the last run that kept the model in VRAM failed "
                          f"({failure_text(res)}); --layout on tries that again, and so does lowvram "
                          f"once flags, model or driver change")
    assert swap is not None
    return RoadChoice("resident", "observations", f"{RESIDENT}: the last run swapping to RAM (offload {rung}) "
                      f"failed ({failure_text(swap)}); {UNTIL_CHANGED}")


@dataclass(frozen=True)
class _Comparison:
    key: tuple[object, ...]
    swap: float
    resident: float
    unit: str  # "s/it" or "s/image"
    runs: tuple[int, int]
    steps: int | None  # the step count of a wall-time comparison
    latest: float
    adjusted: bool = False  # some runs were at another step count: their s/it × steps plus their overhead
    no_wall: int = 0  # runs left without wall time per image (older hooks): why it fell back to s/it


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

    Wall time per image is the figure that decides: s/it is the median per-step time, which drops
    --medvram's once-per-image moves of the text encoder, UNet and VAE. Each run's wall time is
    taken at the user's step count (`search.user_steps`; a run at another count: its s/it × steps
    plus its own per-image overhead, `search.wall_at`). Where a road has no run with wall time
    (records of an older hook), the median s/it, and the reason says so. Each side is the median
    of its latest ROAD_WINDOW runs.
    """
    from lowvram.core.search import user_steps, wall_at

    steps = user_steps([*swap, *res])
    s_wall = [(o, w) for o in swap if (w := wall_at(o, steps)) is not None][-ROAD_WINDOW:]
    r_wall = [(o, w) for o in res if (w := wall_at(o, steps)) is not None][-ROAD_WINDOW:]
    latest = max(o.time for o in [*swap, *res])
    if s_wall and r_wall:
        adjusted = any(o.steps != steps for o, _ in [*s_wall, *r_wall])
        return _Comparison(key, statistics.median(w for _, w in s_wall), statistics.median(w for _, w in r_wall),
                           "s/image", (len(s_wall), len(r_wall)), steps, latest, adjusted)
    s = [o.sit for o in swap if o.sit is not None][-ROAD_WINDOW:]
    r = [o.sit for o in res if o.sit is not None][-ROAD_WINDOW:]
    if not s or not r:
        return None
    no_wall = sum(1 for o in [*swap, *res] if o.wall_s is None)
    return _Comparison(key, statistics.median(s), statistics.median(r), "s/it", (len(s), len(r)), None, latest,
                       no_wall=no_wall)


def _how(c: _Comparison) -> str:
    """How the comparison was made, for the reason."""
    runs = f"median of {c.runs[0]}/{c.runs[1]} runs"
    if c.steps is None:
        if c.no_wall:
            return f"{runs}; s/it only: {NO_WALL}"
        return runs
    if c.adjusted:
        return (f"wall time per image at {plural(c.steps, 'step')}, runs at other step counts taken as their "
                f"s/it × steps plus their per-image overhead, {runs}")
    return f"wall time per image at {plural(c.steps, 'step')}, {runs}"


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


def measured_choice(history: Sequence[Observation], rung: str, target: tuple[object, ...]) -> RoadChoice:
    """The faster road where a like-with-like pair exists (the target's size first), else explore."""
    groups = _measurements(history, rung)
    pairs = {key: c for key, g in groups.items() if (c := _compare(key, g["swap"], g["resident"])) is not None}
    if pairs:
        c = pairs[_preferred(pairs, target, lambda k: pairs[k].latest)]
        faster = "resident" if c.resident < c.swap else "swap"
        return RoadChoice(faster, "observations", f"{road_words(faster)}, the faster way measured at "
                          f"{_where(c.key)}: swap {c.swap:.2f} {c.unit} vs resident {c.resident:.2f} {c.unit} "
                          f"({_how(c)})")
    measured = {measured_road(o) for o in history if not run_failed(o) and (o.sit is not None or o.wall_s is not None)}
    if "swap" not in measured:
        return RoadChoice("swap", "auto", f"{SWAP}: lowvram tries both ways and keeps the faster; this one first, "
                          "then keeping the model in VRAM")
    if "resident" not in measured:
        return RoadChoice("resident", "auto", f"{RESIDENT}: lowvram tries both ways and keeps the faster; now this "
                          "one, with reserve 0 first so the free and spilled memory get measured")
    # Both measured, never like with like: measure the road missing where the user generates.
    key = _preferred(groups, target, lambda k: max(o.time for runs in groups[k].values() for o in runs))
    road = "swap" if not groups[key]["swap"] else "resident"
    return RoadChoice(road, "auto", f"{road_words(road)}: lowvram tries both ways and keeps the faster, but has no "
                      f"swap (offload {rung}) and resident runs at the same size and device to compare yet; "
                      f"this one, to measure it at {_where(key)}")
