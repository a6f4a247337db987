"""`lowvram tune` on Forge (docs/architecture.md#tune): GPU Weights, Swap Method and Swap Location swept through
Forge's own API, `/sdapi/v1/options`, which makes a value live without a restart (modules_forge/main_entry.py
`refresh_memory_management_settings`; the model is unloaded before the next job, which the warm-up pays).

The UI is started as on A1111 (the block applied, `--api --nowebui`, a free loopback port, checked to listen on
loopback only). Forge's quirks, each handled here: a POST of the value already stored is skipped, and in API-only
mode the stored values are not applied at start, so every candidate is made live by posting a different value
first and then the candidate (`set_live`); Forge validates nothing ("Bogus" and −5 are accepted and saved), so
every value is checked here before it is sent (`check_knobs`); every POST is saved into config.json, which the
snapshot taken before anything starts puts back byte for byte, as it does webui-user and lowvram's manifest.

The search (coordinate descent, ≤ MAX_CANDIDATES): the plan's inference memory P first, at Queue/CPU (Forge's
defaults); then below it in 256 MiB steps (two at most) but never below the floor F = max(512, ⌈P ÷ 1.1⌉ rounded
up to 64 MiB): P carries the estimate's 10 % margin, so P ÷ 1.1 is the estimate's working memory itself (where P
is Forge's 1024 the estimate asked for less, and F is 512, under which Forge itself warns that the computation
may fall back to the CPU); then above it, P + 512 and P + 1024 (while GPU Weights stay ≥ 512 MiB). A direction
stops at the first candidate that fails (out of memory) or is more than 10 % slower than the best so far. At the
best inference memory, Swap Method Async is tried, then Swap Location Shared at the best method; each is kept only
where it is faster. Each probe is one warm-up and `--repeats` measured txt2img requests, compared on seconds per
image; each is saved as an observation (source `tuning`, the three settings with it), which the next plan uses.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.estimate.memory import DEFAULT_MARGIN
from lowvram.core.observations import Observation
from lowvram.core.policy.forge_tuned import SWAP_LOCATIONS, SWAP_METHODS
from lowvram.core.words import plural
from lowvram.world import fsutil, paths
from lowvram.world.observation_log import append_observation
from lowvram.world.tune.loopback import check_user_flags
from lowvram.world.tune.results import Probe, Reporter, TuneError, TuneEvent, TuneResult, TuneSettings
from lowvram.world.tune.snapshot import TreeSnapshot, _save_file, stop_then_restore
from lowvram.world.tune.ui_api import ApiClient, failure_reason, txt2img_payload
from lowvram.world.tune.ui_process import _TuneUi

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.plan import Plan
    from lowvram.world.fsutil import FileLock

OPTIONS = "/sdapi/v1/options"
KEYS = ("forge_inference_memory", "forge_async_loading", "forge_pin_shared_memory")
ROAD = "forge"
FLOOR_MB = 512  # Forge's own "[Low VRAM Warning]" below min(512, 5 % of total)
DOWN_STEP_MB, DOWN_STEPS = 256, 2
UP_STEPS_MB = (512, 1024)
SLOWER = 0.10  # a direction stops at a candidate this much slower than the best
MAX_CANDIDATES = 8
RESTORED = ("webui-user, Forge's config.json (every option tune posted) and lowvram's manifest restored byte for "
            "byte as they were before tune")


@dataclass(frozen=True)
class Knobs:
    inference_mb: int
    method: str = "Queue"
    location: str = "CPU"

    def words(self) -> str:
        return f"{self.inference_mb} MiB {self.method}/{self.location}"


def check_knobs(k: Knobs, vram_total_mb: int | None) -> None:
    """Forge accepts any value and saves it: tune sends only values Forge's own controls can hold."""
    top = vram_total_mb if vram_total_mb else 1 << 20
    if isinstance(k.inference_mb, bool) or not isinstance(k.inference_mb, int) or not 0 <= k.inference_mb <= top:
        raise TuneError(f"forge_inference_memory {k.inference_mb!r} is not a whole number of MiB from 0 to {top}",
                        "this is a bug in lowvram; nothing was sent to Forge")
    if k.method not in SWAP_METHODS or k.location not in SWAP_LOCATIONS:
        raise TuneError(f"Swap Method {k.method!r} / Swap Location {k.location!r} are not Forge's values "
                        f"({'/'.join(SWAP_METHODS)}, {'/'.join(SWAP_LOCATIONS)})",
                        "this is a bug in lowvram; nothing was sent to Forge")


def inference_candidates(start: int, vram_total_mb: int | None) -> tuple[list[int], list[int]]:
    """(below the plan's value, above it), each nearest first; the rule is in the module's docstring."""
    floor = FLOOR_MB if start <= 1024 else max(FLOOR_MB, 64 * math.ceil(start / (1 + DEFAULT_MARGIN) / 64))
    down = [v for v in (start - DOWN_STEP_MB * n for n in range(1, DOWN_STEPS + 1)) if v >= floor]
    top = (vram_total_mb - FLOOR_MB) if vram_total_mb else start + max(UP_STEPS_MB)
    up = [start + step for step in UP_STEPS_MB if start + step <= top]
    return down, up


def set_live(client: ApiClient, knobs: Knobs, timeout: float) -> None:
    """Each setting made live: a different value first (a POST of the stored value is skipped, and API-only
    Forge did not apply the stored one at start), then the candidate's; read back to be sure."""
    other = {"Queue": "Async", "Async": "Queue", "CPU": "Shared", "Shared": "CPU"}
    wanted: dict[str, Any] = {KEYS[0]: knobs.inference_mb, KEYS[1]: knobs.method, KEYS[2]: knobs.location}
    for key, value in wanted.items():
        first = value + 1 if isinstance(value, int) else other[value]
        for body in ({key: first}, {key: value}):
            status, answer = client.post(OPTIONS, body, timeout=timeout)
            if status != 200:
                raise TuneError(f"Forge refused {body} on {OPTIONS}: {failure_reason(status, answer)}",
                                "is this a Forge with the GPU Weights slider (Forge 2)? reForge has none")
    status, now = client.get(OPTIONS, timeout=timeout)
    got = {k: now.get(k) for k in KEYS} if status == 200 and isinstance(now, dict) else {}
    if got != wanted:
        raise TuneError(f"Forge's options read back {got or status}, not {wanted}",
                        "Forge did not take the settings: is another client changing them?")


class ForgeTune:
    """A tune of Forge: the UI started once, the candidates made live through its API, the tree put back."""

    restored = RESTORED

    def __init__(self, *, ctx: Any, facts: Facts, settings: TuneSettings, report: Reporter, lock: FileLock,
                 gpu: Any, size: tuple[int, int]) -> None:
        self.plan: Plan = ctx.plan
        self.webui = Path(ctx.webui)
        self.facts, self.settings, self.report = facts, settings, report
        self.width, self.height = size
        self.vram_total_mb: int | None = gpu.vram_total_mb if gpu is not None else None
        self.driver: str | None = gpu.driver if gpu is not None else None
        webui_facts = facts.webui
        self.checkpoint = webui_facts.checkpoint_key if webui_facts is not None else None
        self.obs_path = paths.observations_path(self.webui)
        self.probes: list[Probe] = []
        self.saved = 0
        self.deadline = time.monotonic() + settings.max_minutes * 60.0
        config = self.webui / "config.json"  # Forge saves every POSTed option here: put back as it was
        real = fsutil.write_target(config, self.webui, "Forge's settings file")
        snap = TreeSnapshot.take(self.webui)
        self.snapshot = replace(snap, files=(*snap.files, (real, _save_file(real))))
        self.ui = _TuneUi(webui=self.webui, facts=facts, settings=settings, report=report, lock=lock,
                          log_path=paths.webui_state_dir(self.webui) / "tune-ui.log", time_left=self._time_left)

    def _time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> TuneResult:
        start = self.plan.decision("forge_inference_memory")
        if start is None or not isinstance(start.value, int):
            raise TuneError("the plan decides no forge_inference_memory for this Forge (no estimate for its model)",
                            "give the model with --model, or see `lowvram plan`")
        check_user_flags(self.facts, self.report)
        self.report(TuneEvent("plan", f"tuning Forge's GPU Weights, Swap Method and Swap Location in {self.webui} at "
                                      f"{self.width}×{self.height}, {plural(self.settings.steps, 'step')}, "
                                      f"{plural(self.settings.repeats, 'measured run')} per candidate"))
        self.ui.apply(self.plan)
        self.ui.start(self.plan)
        try:
            closed, why = self._search(start.value)
        finally:
            self.ui.stop()
        return result(self, closed, why, start.value)

    def _budget(self) -> int:
        return self.settings.max_candidates or MAX_CANDIDATES

    def _search(self, start: int) -> tuple[bool, str]:
        first = self.probe(Knobs(start))
        best = first if first.ok else None
        down, up = inference_candidates(start, self.vram_total_mb)
        for direction in (down, up):
            for mb in direction:
                if len(self.probes) >= self._budget() or self._time_left() <= 0:
                    return False, f"stopped after {plural(len(self.probes), 'candidate')} (limit or time)"
                p = self.probe(Knobs(mb))
                if best is None or (p.ok and (p.speed or 0.0) < (best.speed or 0.0)):
                    best = p if p.ok else best
                    continue
                if not p.ok or (p.speed or 0.0) > (best.speed or 0.0) * (1 + SLOWER):
                    break  # failed or > 10 % slower: this direction stops
        if best is None:
            return False, "no inference memory ran"
        for field, value in (("method", "Async"), ("location", "Shared")):
            if len(self.probes) >= self._budget() or self._time_left() <= 0:
                return False, f"stopped after {plural(len(self.probes), 'candidate')} (limit or time)"
            knobs = _knobs(best)
            p = self.probe(replace(knobs, method=value) if field == "method" else replace(knobs, location=value))
            if p.ok and (p.speed or 0.0) < (best.speed or 0.0):
                best = p
        return True, f"closed after {plural(len(self.probes), 'candidate')}"

    def probe(self, knobs: Knobs) -> Probe:
        check_knobs(knobs, self.vram_total_mb)
        self.ui.ensure(self.plan)
        client = self.ui.client
        assert client is not None
        self.report(TuneEvent("probing", f"Forge at inference memory {knobs.words()}"))
        timeout = min(60.0, max(5.0, self._time_left() + 30.0))
        set_live(client, knobs, timeout)
        walls, failure = _measure(self, client)
        probe = _judge(knobs, walls, failure, self.settings.steps)
        self.probes.append(probe)
        append_observation(self.obs_path, observation(self, probe))  # kept as measured: a kill keeps it
        self.saved += 1
        self.report(TuneEvent("probe", probe=probe))
        return probe

    def restore(self) -> list[str]:
        """Stop the UI, then put back the tree (webui-user, config.json, lowvram's manifest) byte for byte."""
        return stop_then_restore(self.ui.stop, self.snapshot.restore)


def _measure(t: ForgeTune, client: ApiClient) -> tuple[list[float], str]:
    """One warm-up (it pays the model reload the change caused) and the measured runs."""
    payload = txt2img_payload(t.width, t.height, t.settings.steps)
    walls: list[float] = []
    for n in range(1 + t.settings.repeats):
        timeout = min(t.settings.request_timeout_s, max(30.0, t._time_left() + 30.0))
        t0 = time.monotonic()
        try:
            status, body = client.post("/sdapi/v1/txt2img", payload, timeout=timeout)
        except OSError as exc:
            code = t.ui.exited_within(2.0)
            failure = f"the UI exited with code {code}" if code is not None else f"no answer: {exc}"
            t.ui.restart_needed(t.plan, failure)
            return walls, failure
        if status != 200:
            return walls, failure_reason(status, body)
        if n > 0:
            walls.append(time.monotonic() - t0)
    return walls, ""


def observation(t: ForgeTune, p: Probe) -> Observation:
    return Observation(
        time=time.time(), source="tuning", checkpoint=t.checkpoint, family=t.plan.model_family,
        flags=tuple(t.plan.args), offload=t.plan.offload, vram_total_mb=t.vram_total_mb, sit=p.sit,
        width=t.width, height=t.height, batch=1, steps=t.settings.steps, wall_s=p.wall_s,
        images=1 if p.wall_s is not None else None, ooms=p.ooms, ok=p.ok, reason=p.reason, driver=t.driver,
        tag="tune", forge_inference_mb=p.reserve_mb, forge_swap_method=p.swap_method,
        forge_swap_location=p.swap_location)


def result(t: ForgeTune, closed: bool, reason: str, start: int) -> TuneResult:
    ok = [p for p in t.probes if p.ok and p.speed is not None]
    best = min(ok, key=lambda p: p.speed or 0.0) if ok else None
    first = next((p for p in t.probes if _knobs(p) == Knobs(start)), None)
    return TuneResult(best=best, start=first, probes=tuple(t.probes), closed=closed, reason=reason,
                      width=t.width, height=t.height, steps=t.settings.steps,
                      repeats=t.settings.repeats, roads=(ROAD,), webui=str(t.webui), saved=t.saved,
                      start_plan={"forge_inference_memory": start})


def _knobs(p: Probe) -> Knobs:
    return Knobs(p.reserve_mb, p.swap_method or "Queue", p.swap_location or "CPU")


def _judge(knobs: Knobs, walls: list[float], failure: str, steps: int) -> Probe:
    common: dict[str, Any] = {"walls": tuple(walls), "swap_method": knobs.method, "swap_location": knobs.location}
    if failure:
        oom = "out of memory" in failure
        return Probe(ROAD, knobs.inference_mb, None, False, failure, ooms=int(oom), **common)
    if not walls:
        return Probe(ROAD, knobs.inference_mb, None, False, "no measured run", **common)
    wall = round(statistics.median(walls), 6)
    return Probe(ROAD, knobs.inference_mb, round(wall / steps, 6), True, sit_source="wall", wall_s=wall, **common)


def forge_tune(*, ctx: Any, facts: Facts, settings: TuneSettings, report: Reporter, lock: FileLock,
               gpu: Any, size: tuple[int, int]) -> ForgeTune:
    return ForgeTune(ctx=ctx, facts=facts, settings=settings, report=report, lock=lock, gpu=gpu, size=size)


__all__ = ["ForgeTune", "Knobs", "check_knobs", "forge_tune", "inference_candidates", "set_live"]
