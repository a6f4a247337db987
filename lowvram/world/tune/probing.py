"""Judging probes and roads: which roads to measure, each candidate probed through the API, what
the hook recorded of it, and the best of them.

A probe counts only for what the hook really did: a resident probe whose layout did not run is a
failed probe, not a resident measurement.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.observations import Observation, measured_road, run_failed
from lowvram.core.words import plural
from lowvram.world.observation_log import append_observation, load_observations
from lowvram.world.tune.results import MAX_PER_ROAD, Probe, Reporter, TuneError, TuneEvent, TuneResult, TuneSettings
from lowvram.world.tune.ui_api import ApiClient, failure_reason, txt2img_payload
from lowvram.world.tune.ui_process import _TuneUi

if TYPE_CHECKING:
    from lowvram.core.plan import Plan


NO_HOOK_RECORD = ("the hook recorded none of these jobs, so the layout cannot have run (is "
                  "extensions/lowvram-layout loaded? the UI's output is in tune-ui.log)")


def judge_probe(road: str, reserve: int, walls: Sequence[float], failure: str, *, hook: Sequence[Observation],
                measured: Sequence[Observation], steps: int) -> Probe:
    """One probe from what the API answered (`walls`, `failure`) and what the hook recorded of its
    jobs (`hook`: all of them, `measured`: those after the warm-up).

    It counts only for what the hook really did: on the resident road a job whose layout did not
    run (refused, failed and rolled back, or no hook record at all) makes the probe a failed one,
    not a resident measurement. The swap road needs no hook: wall time ÷ steps stands in for it.
    """
    ooms = sum(o.ooms for o in hook)
    common: dict[str, Any] = {
        "walls": tuple(walls), "free_mb": _median_int([o.free_mb for o in hook]),
        "overflow_mb": max((o.overflow_mb for o in hook if o.overflow_mb is not None), default=None),
        "ooms": ooms, "device": next((o.device for o in reversed(hook) if o.device), None)}
    if failure:
        return Probe(road, reserve, None, False, failure, sit_source="wall", **common)
    if road == "resident":
        skipped = [o for o in hook if measured_road(o) != "resident"]
        why = next((o.layout_error for o in skipped if o.layout_error), "") if skipped else ""
        if skipped or not hook:
            why = why or ("the hook did not lay the model out" if skipped else NO_HOOK_RECORD)
            return Probe(road, reserve, None, False, f"the layout did not run: {why}", sit_source="hook",
                         layout_error=why, **common)
    good = [o for o in measured if not run_failed(o)]
    failed = [o for o in hook if run_failed(o)]
    if failed and not good:
        reason = (f"out of memory (the hook counted {ooms})" if ooms
                  else failed[-1].reason or "the job failed (the hook's record)")
        return Probe(road, reserve, None, False, reason, sit_source="hook", **common)
    sits = [o.sit for o in good if o.sit is not None]
    per_image = [o.wall_s for o in good if o.wall_s is not None]
    wall = round(statistics.median(per_image or walls), 6) if (per_image or walls) else None
    if sits:
        return Probe(road, reserve, round(statistics.median(sits), 6), True, sit_source="hook", wall_s=wall, **common)
    return Probe(road, reserve, round(statistics.median(walls) / steps, 6), True, sit_source="wall", wall_s=wall,
                 **common)


def road_outcome(road: str, probes: Sequence[Probe], done: bool, why: str) -> tuple[bool, str]:
    """(closed, reason) for one road, saying what failed: a road none of whose probes succeeded was
    not measured, whatever the search said."""
    failed = [p for p in probes if not p.ok]
    if probes and len(failed) == len(probes):
        return False, f"{road} road not measured: {failed[-1].reason}"
    if failed:
        return done, f"{why} ({len(failed)} of {plural(len(probes), 'probe')} failed)"
    return done, why


@dataclass
class _Road:
    name: str
    plan: Plan


def _roads(base_plan: Plan, wanted: str, road_plan: Callable[[str], Plan],
           note: Callable[[str], None] = lambda _m: None) -> list[_Road]:
    """The roads to measure for `--roads wanted`, the profile's road first."""
    resident: Plan | None = None
    if wanted in ("auto", "resident"):
        candidate = base_plan if base_plan.road == "resident" else road_plan("on")
        if candidate.road == "resident" and candidate.reserve.applied and not candidate.hook.enabled:
            if wanted == "resident":  # the layout cannot run: every probe would fail after the UI started
                raise TuneError("the resident road needs the layout hook, and it is off (LOWVRAM_HOOK=off): every "
                                "probe would fail, so tune starts nothing",
                                "unset LOWVRAM_HOOK to tune the reserve, or run `lowvram tune --roads swap`")
            note("the layout hook is off (LOWVRAM_HOOK=off): only the swap road is measured")
        elif candidate.road == "resident" and candidate.reserve.applied:
            resident = candidate
        elif wanted == "resident":
            raise TuneError("only the swap road exists here: memory cannot spill into shared memory "
                            "(native Linux, or sysmem fallback off), so there is no reserve to tune",
                            "run `lowvram tune --roads swap`, or `--sysmem-fallback on` if the driver does spill")
    swap: Plan | None = None
    if wanted in ("auto", "swap"):
        swap = base_plan if base_plan.road == "swap" else road_plan("off")
        if swap.road != "swap":
            swap = None
    out: list[_Road] = []
    if resident is not None:
        out.append(_Road("resident", resident))
    if swap is not None:
        out.append(_Road("swap", swap))
    if not out:
        raise TuneError("no road to tune for this plan", "check `lowvram plan` for its road")
    out.sort(key=lambda r: r.name != base_plan.road)  # the profile's road first (docs/architecture.md#the-policy)
    return out


class _Ledger:
    """The probes: each judged, saved as an observation as it is measured, and the best and the result."""

    def __init__(self, *, webui: Path, base_plan: Plan, settings: TuneSettings, checkpoint: str | None,
                 driver: str | None, vram_total_mb: int | None, width: int, height: int, obs_path: Path) -> None:
        self.webui = webui
        self.base_plan = base_plan
        self.settings = settings
        self.checkpoint = checkpoint
        self.driver = driver
        self.vram_total_mb = vram_total_mb
        self.width, self.height = width, height
        self.obs_path = obs_path
        self.probes: list[Probe] = []
        self.saved = 0
        self.start_probe: Probe | None = None

    def judge(self, road: str, reserve: int, walls: list[float], failure: str, *, tag: str,
              measure_from: float) -> Probe:
        hook = [o for o in load_observations(self.obs_path).items
                if o.source == "hook" and o.tag == tag]
        measured = [o for o in hook if o.time >= measure_from] if measure_from else []
        probe = judge_probe(road, reserve, walls, failure, hook=hook, measured=measured, steps=self.settings.steps)
        # One UI, one device: a probe the hook recorded nothing of (it hung, the UI died) ran where the others did.
        known = next((p.device for p in self.probes if p.device), None)
        return replace(probe, device=known) if probe.device is None and known else probe

    def keep(self, road: _Road, reserve: int, probe: Probe) -> None:
        """A probe judged: kept, saved, and noted as the start when it is the profile's own candidate."""
        self.probes.append(probe)
        self.save(road.plan, probe)
        if (self.start_probe is None and road.name == self.base_plan.road
                and (road.name == "swap" or reserve == self.base_plan.reserve.mb)):
            self.start_probe = probe

    def observation(self, plan: Plan | None, probe: Probe) -> Observation:
        return Observation(
            time=time.time(), source="tuning", checkpoint=self.checkpoint,
            family=plan.model_family if plan is not None else None,
            flags=tuple(plan.args) if plan is not None else (), road=probe.road,
            offload=plan.offload if plan is not None else None,
            layout=probe.road == "resident" and not probe.layout_error, layout_error=probe.layout_error or None,
            device=probe.device, reserve_mb=probe.reserve_mb if probe.road == "resident" else None,
            free_mb=probe.free_mb, overflow_mb=probe.overflow_mb, vram_total_mb=self.vram_total_mb,
            sit=probe.sit, width=self.width, height=self.height, batch=1, steps=self.settings.steps,
            wall_s=probe.wall_s, images=1 if probe.wall_s is not None else None,
            ooms=probe.ooms, ok=probe.ok, reason=probe.reason, driver=self.driver, tag="tune")

    def save(self, plan: Plan, probe: Probe) -> None:
        """Kept as it is measured, so a tune killed outright still leaves what it learnt."""
        append_observation(self.obs_path, self.observation(plan, probe))
        self.saved += 1

    def result(self, closed: bool, reason: str, roads: list[str]) -> TuneResult:
        return TuneResult(best=self.best(), start=self.start_probe, probes=tuple(self.probes), closed=closed,
                          reason=reason, width=self.width, height=self.height, steps=self.settings.steps,
                          repeats=self.settings.repeats, roads=tuple(roads), webui=str(self.webui),
                          saved=self.saved,
                          start_plan={"road": self.base_plan.road, "reserve_mb": self.base_plan.reserve.mb})

    def best(self) -> Probe | None:
        """The winner as the pure search judges it: the fastest value whose neighbours do not swing,
        by wall time per image where every probe has it (s/it hides --medvram's model moves).

        The next plan reads the same probes through `lowvram.core.search`, so tune names the same winner.
        """
        from lowvram.core import search

        ok = [p for p in self.probes if p.ok and p.sit is not None]
        if not ok:
            return None
        runs = search.like_with_like([self.observation(None, p) for p in ok])
        ok = [p for p in ok if p.device == runs[0].device] if runs else ok
        judged = search.best_probe(search.make_probes(runs))
        if judged is None:
            return min(ok, key=lambda p: (p.speed or 0.0, p.reserve_mb))
        same = [p for p in ok if p.road == judged.road and (p.road == "swap" or p.reserve_mb == judged.reserve_mb)]
        return min(same, key=lambda p: p.speed or 0.0) if same else None


class _Prober:
    """One road's measurements: the resident reserves searched, each candidate probed through the API."""

    def __init__(self, *, ui: _TuneUi, ledger: _Ledger, base_plan: Plan, settings: TuneSettings,
                 report: Reporter, hook_path: Path, run_tag: str, time_left: Callable[[], float]) -> None:
        self.ui = ui
        self.ledger = ledger
        self.base_plan = base_plan
        self.settings = settings
        self.report = report
        self.hook_path = hook_path
        self.run_tag = run_tag
        self.time_left = time_left

    def search_resident(self, road: _Road) -> tuple[bool, str]:
        """Reserve 0 first, the profile's starting reserve next, then what the pure search proposes."""
        from lowvram.core import search
        from lowvram.core.estimate.memory import CUDA_CONTEXT_MB

        led = self.ledger
        start_reserve = self.base_plan.reserve.mb if self.base_plan.road == "resident" else None
        measured: list[int] = []
        while True:
            if len(measured) >= MAX_PER_ROAD:
                return True, f"resident road: closed after {plural(len(measured), 'candidate')}"
            if self.time_left() <= 0:
                return False, f"resident road: out of time after {plural(len(measured), 'candidate')}"
            if not measured:
                nxt = 0
            elif start_reserve is not None and start_reserve not in measured:
                nxt = start_reserve
            else:
                observations = load_observations(led.obs_path).items
                state = search.tuning_state(observations, led.checkpoint, led.driver, (led.width, led.height),
                                            max_candidates=MAX_PER_ROAD, vram_total_mb=led.vram_total_mb,
                                            cuda_context_mb=CUDA_CONTEXT_MB)
                if state.closed:
                    return True, f"resident road: {state.reason}"
                candidate = state.next_candidate
                if candidate is None:
                    return False, ("resident road: no free/overflow measurement to bound the search "
                                   "(is the layout hook installed? `lowvram reserve --add` records a reading)")
                nxt = candidate
                if nxt in measured:
                    return True, f"resident road: converged ({state.reason})"
            measured.append(nxt)
            probe = self.probe(road, nxt)
            if probe.layout_error and nxt == 0:  # not even the smallest reserve: the layout does not run here
                return False, f"resident road not measured: {probe.reason}"

    def probe(self, road: _Road, reserve: int) -> Probe:
        from lowvram.world.hookconfig import with_reserve, write_hook_config

        self.ui.ensure(road.plan)
        client = self.ui.client
        assert client is not None
        tag = f"{self.run_tag}-{len(self.ledger.probes) + 1}"
        layout = road.name == "resident"
        cfg = with_reserve(_read_json(self.hook_path) or {}, reserve, layout=layout, tag=tag)
        write_hook_config(self.hook_path, {**cfg, "flags": list(road.plan.args)})  # the road's, as the hook records
        self.report(TuneEvent("probing", f"{road.name} road, reserve {reserve} MiB"))
        walls, failure, measure_from = self._measure(road, client)
        probe = self.ledger.judge(road.name, reserve, walls, failure, tag=tag, measure_from=measure_from)
        self.ledger.keep(road, reserve, probe)
        self.report(TuneEvent("probe", probe=probe))
        return probe

    def _measure(self, road: _Road, client: ApiClient) -> tuple[list[float], str, float]:
        """One warm-up and the measured runs: their walls, why they stopped (if they did), when measuring began."""
        payload = txt2img_payload(self.ledger.width, self.ledger.height, self.settings.steps)
        walls: list[float] = []
        failure = ""
        measure_from = 0.0
        for n in range(1 + self.settings.repeats):
            if n == 1:
                measure_from = time.time()
            timeout = min(self.settings.request_timeout_s, max(30.0, self.time_left() + 30.0))
            t0 = time.monotonic()
            try:
                status, body = client.post("/sdapi/v1/txt2img", payload, timeout=timeout)
            except TimeoutError:
                failure = f"no answer within {timeout:.0f} s"
                self.ui.restart_needed(road.plan, failure)
                break
            except OSError as exc:
                code = self.ui.exited_within(2.0)
                failure = (f"the UI exited with code {code}" if code is not None
                           else f"connection failed: {exc.strerror or exc}")
                self.ui.restart_needed(road.plan, failure)
                break
            wall = time.monotonic() - t0
            if status != 200:
                failure = failure_reason(status, body)
                break
            if n > 0:
                walls.append(wall)
        return walls, failure, measure_from


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    raw = _read_bytes(path)
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _median_int(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return int(statistics.median(present)) if present else None
