"""`lowvram tune`: the reserve search giant-kitten's users do by hand, done by measuring (docs/architecture.md#tune).

The UI is started as `launch` starts it (the managed block, the hook, `webui.sh`), with its API only,
on a free loopback port. Each candidate reserve is written into the hook config (the hook re-reads
it at the next job), then one warm-up txt2img and K measured ones are sent; s/it is the median wall
time over the steps, or the hook's own per-step timing of those jobs when it recorded one. What to
try next comes from the pure search in `lowvram.core.search`. Whatever happens (done, Ctrl-C, SIGTERM, a
time limit, an error) the UI's process group is stopped, what tune changed in the tree and the
state dir (webui-user, the hook and its config, the manifest and its backups) is put back byte for
byte as it was before tune, and every probe is kept as an observation with source `tuning`, which
the next plan uses.

_Session runs the roads and puts things back; _TuneUi (ui_process.py) starts, restarts and stops the
UI; _Prober (probing.py) measures one road's reserves; _Ledger (probing.py) keeps the probes, saves
them, and names the best.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.policy.forge_tuned import FORGE_SLIDER_UIS
from lowvram.core.words import plural
from lowvram.world import paths
from lowvram.world.fsutil import FileLock
from lowvram.world.tune.loopback import check_user_flags
from lowvram.world.tune.probing import _Ledger, _Prober, _Road, _roads, road_outcome
from lowvram.world.tune.results import (
    FAMILY_SIZES,
    RESTORED,
    Probe,
    Reporter,
    TuneError,
    TuneEvent,
    TuneInterruptedError,
    TuneResult,
    TuneSettings,
)
from lowvram.world.tune.snapshot import TreeSnapshot, stop_then_restore
from lowvram.world.tune.ui_process import _TuneUi

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.plan import Overrides, Plan


class _Session:
    """A tune run: the roads in turn, each applied, its UI started, measured and stopped; then everything put back."""

    def __init__(self, *, ctx: Any, facts_file: Path | None, overrides: Overrides, settings: TuneSettings,
                 report: Reporter, lock: FileLock) -> None:
        self.settings = settings
        self.report = report
        self.overrides = overrides
        self.facts_file = facts_file
        self.webui = Path(ctx.webui)
        self.base_plan = ctx.plan
        if self.base_plan.ui != "a1111":
            raise TuneError(f"tune drives A1111's API and the layout hook; this WebUI is {self.base_plan.ui}",
                            "use `lowvram launch` there; the reserve search needs A1111")
        # --facts stands for the GPU only: the UI started (and the webui-user file written) is this machine's.
        self.facts = _local_facts(ctx.facts, self.webui) if ctx.from_facts_file else ctx.facts
        webui_facts = self.facts.webui
        gpu = _gpu(self.facts, self.base_plan)
        width, height = _target_size(self.base_plan, settings)
        self.ledger = _Ledger(webui=self.webui, base_plan=self.base_plan, settings=settings,
                              checkpoint=webui_facts.checkpoint_key if webui_facts is not None else None,
                              driver=gpu.driver if gpu is not None else None,
                              vram_total_mb=gpu.vram_total_mb if gpu is not None else None,
                              width=width, height=height, obs_path=paths.observations_path(self.webui))
        self.snapshot = TreeSnapshot.take(self.webui)  # before anything changes: restore() puts it back
        self.ui = _TuneUi(webui=self.webui, facts=self.facts, settings=settings, report=report, lock=lock,
                          log_path=paths.webui_state_dir(self.webui) / "tune-ui.log", time_left=self._time_left)
        self.prober = _Prober(ui=self.ui, ledger=self.ledger, base_plan=self.base_plan, settings=settings,
                              report=report, hook_path=paths.hook_config_path(self.webui),
                              run_tag=f"tune-{int(time.time())}-{os.getpid()}", time_left=self._time_left)
        self.deadline = time.monotonic() + settings.max_minutes * 60.0

    @property
    def probes(self) -> list[Probe]:
        return self.ledger.probes

    def roads(self) -> list[_Road]:
        from lowvram.world.plan_inputs import make_plan

        def road_plan(layout: str) -> Plan:
            return make_plan(webui=self.webui, facts_file=self.facts_file,
                             overrides=replace(self.overrides, layout=layout)).plan

        return _roads(self.base_plan, self.settings.roads, road_plan,
                      note=lambda message: self.report(TuneEvent("note", message)))

    def run(self) -> TuneResult:
        check_user_flags(self.facts, self.report)
        self.report(TuneEvent("plan", f"tuning {self.webui} at {self.ledger.width}×{self.ledger.height}, "
                                      f"{plural(self.settings.steps, 'step')}, "
                                      f"{plural(self.settings.repeats, 'measured run')} per candidate"))
        roads = self.roads()
        closed = True
        reasons: list[str] = []
        for road in roads:
            if self._time_left() <= 0:
                closed = False
                reasons.append(f"{road.name} road not measured: out of time")
                continue
            done, why = self._run_road(road)
            closed = closed and done
            reasons.append(why)
        return self.ledger.result(closed, "; ".join(reasons), [r.name for r in roads])

    def _run_road(self, road: _Road) -> tuple[bool, str]:
        self.ui.restarts = 0
        first = len(self.probes)
        self.ui.apply(road.plan)
        self.ui.start(road.plan)
        try:
            if road.name == "swap":
                self.prober.probe(road, 0)
                done, why = True, "swap road measured"
            else:
                done, why = self.prober.search_resident(road)
        finally:
            self.ui.stop()
        return road_outcome(road.name, self.probes[first:], done, why)

    def restore(self) -> list[str]:
        """Stop the UI, then put back everything as it was before tune. Returns what failed."""
        return stop_then_restore(self.ui.stop, self.snapshot.restore)

    def _time_left(self) -> float:
        return self.deadline - time.monotonic()

    def partial(self) -> TuneResult:
        return self.ledger.result(False, "interrupted", [])


def run_tune(*, webui: Path | None, facts_file: Path | None, overrides: Overrides, settings: TuneSettings,
             report: Reporter | None = None) -> TuneResult:
    """Measure the candidates and return what was found; everything is put back before returning."""
    settings.check()
    emit: Reporter = report or (lambda _e: None)
    from lowvram.world.detect import detect_flavor, resolve_webui
    from lowvram.world.plan_inputs import make_plan

    # The WebUI first (tune needs a local one to start), then the plan for it.
    found = resolve_webui(webui)
    if found is None:
        raise TuneError("no WebUI found to tune: tune starts a local A1111 and measures it",
                        "point at one with --webui PATH (or LOWVRAM_WEBUI), or install one with `lowvram setup`")
    flavor = detect_flavor(found)
    if flavor not in (*FORGE_SLIDER_UIS, "a1111", "comfyui"):  # reForge (Forge 1) and Forge Neo have no GPU Weights
        which = {"reforge": ", which has no GPU Weights slider",
                 "forge-neo": ", which has no GPU Weights slider (its memory management is ComfyUI's: --reserve-vram, "
                              "which tune does not sweep on Forge Neo yet)"}.get(flavor or "", "")
        raise TuneError(f"tune drives A1111's API and the layout hook, Forge's GPU Weights or ComfyUI's "
                        f"--reserve-vram; {found} is {flavor}{which}",
                        "use `lowvram launch` there; the search needs A1111, Forge or ComfyUI")
    if settings.extra_args and flavor != "comfyui":
        from lowvram.core.errors import UsageError

        raise UsageError("flags after `--` are for ComfyUI's command line; A1111 reads yours from webui-user",
                         "put them in webui-user's COMMANDLINE_ARGS, where tune reads them")
    ctx = make_plan(webui=found, facts_file=facts_file, overrides=overrides)
    refuse_untunable(ctx.plan, ctx.facts)
    target = Path(ctx.webui or found)
    lock = FileLock(paths.lock_path(target), what=f"the WebUI at {target}")
    lock.acquire()
    try:
        with _sigterm_as_interrupt():
            session: Any = (_comfy(ctx, settings, emit, lock) if ctx.plan.ui == "comfyui" else
                            _forge(ctx, settings, emit, lock) if ctx.plan.ui in FORGE_SLIDER_UIS else
                            _Session(ctx=ctx, facts_file=facts_file, overrides=overrides, settings=settings,
                                     report=emit, lock=lock))
            try:
                result: TuneResult = session.run()
            except KeyboardInterrupt:
                problems = _quietly(session.restore)
                raise TuneInterruptedError(
                    f"interrupted: {plural(len(session.probes), 'probe')} kept as observations; the UI was stopped"
                    + (f" and {getattr(session, 'restored', RESTORED)}" if not problems
                       else f", but {'; '.join(problems)}"),
                    "run `lowvram tune` again to finish the search (`lowvram reserve` shows where it stands)",
                ) from None
            except BaseException:
                for problem in _quietly(session.restore):
                    emit(TuneEvent("note", problem))
                raise
            problems = _quietly(session.restore)
            if problems:
                raise TuneError(f"tuning finished but {'; '.join(problems)}",
                                "put those back by hand (`lowvram revert` takes lowvram's block and hook out; "
                                "`lowvram apply` writes them afresh)")
            return result
    finally:
        lock.release()


def _comfy(ctx: Any, settings: TuneSettings, report: Reporter, lock: FileLock) -> Any:
    """ComfyUI's tune (world/tune/comfy.py): one ComfyUI start per --reserve-vram candidate."""
    from lowvram.world.tune.comfy import comfy_session

    facts = _local_facts(ctx.facts, Path(ctx.webui)) if ctx.from_facts_file else ctx.facts
    return comfy_session(ctx=ctx, facts=facts, settings=settings, report=report, lock=lock,
                         gpu=_gpu(facts, ctx.plan), size=_target_size(ctx.plan, settings))


def _forge(ctx: Any, settings: TuneSettings, report: Reporter, lock: FileLock) -> Any:
    """Forge's tune (world/tune/forge.py): GPU Weights, Swap Method and Swap Location through its options API."""
    from lowvram.world.tune.forge import forge_tune

    facts = _local_facts(ctx.facts, Path(ctx.webui)) if ctx.from_facts_file else ctx.facts
    return forge_tune(ctx=ctx, facts=facts, settings=settings, report=report, lock=lock,
                      gpu=_gpu(facts, ctx.plan), size=_target_size(ctx.plan, settings))


def refuse_untunable(plan: Plan, facts: Facts) -> None:
    """TuneError, before anything starts, where there is nothing to tune: no NVIDIA GPU in the plan
    means no reserve to keep in VRAM and no offload level to choose (the UI runs on the CPU, or a GPU
    lowvram plans nothing for), so a UI started only to be measured would tell nothing."""
    if plan.gpu_index is not None:
        return
    if facts.other_gpus:
        why = "this machine's GPU is not NVIDIA (" + ", ".join(
            f"{o.vendor} {o.name or ''}".strip() for o in facts.other_gpus) + ")"
    else:
        why = f"no NVIDIA GPU here ({facts.nvml_error or 'NVML found none'})"
    raise TuneError(f"nothing to tune: {why}, so there is no VRAM reserve and no offload level to measure; "
                    "tune started nothing",
                    "`lowvram launch` starts the UI as planned; if this machine has an NVIDIA GPU, "
                    "`lowvram doctor` shows why it was not found")


def _quietly(restore: Callable[[], list[str]]) -> list[str]:
    """Run the restore with Ctrl-C and SIGTERM held off: a second one must not leave the UI running.

    (The restore is bounded: the UI's group gets SIGKILL after --stop-timeout.)
    """
    if os.name == "nt" or not _main_thread():
        return restore()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return restore()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a tune the way Ctrl-C does (the UI stopped, everything put back)."""
    if os.name == "nt" or not _main_thread():
        yield
        return

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _local_facts(facts: Facts, webui: Path | None = None) -> Facts:
    """Facts from a file stand for the GPU; the OS that runs the UI and reads webui-user is this one.

    The tree was read for the file's OS (webui-user.bat for Windows facts): `webui` is read again
    for this one, so the user's flags are those of the webui-user file the UI really sources.
    """
    here = {"win32": "windows", "darwin": "darwin"}.get(sys.platform, "linux")
    if facts.system.os == here:
        return facts
    local = replace(facts, system=replace(facts.system, os=here))
    if webui is not None:
        from lowvram.world.detect.webui import probe_webui

        local = local.with_webui(probe_webui(webui, os_name=here))
    return local


def _gpu(facts: Facts, plan: Plan) -> Any:
    gpus = facts.usable_gpus
    if not gpus:
        return None
    if plan.gpu_index is not None:
        for gpu in gpus:
            if gpu.index == plan.gpu_index:
                return gpu
    return max(gpus, key=lambda g: g.vram_total_mb or 0)


def _target_size(plan: Plan, settings: TuneSettings) -> tuple[int, int]:
    if settings.width is not None and settings.height is not None:
        return settings.width, settings.height
    extra = plan.extra if isinstance(plan.extra, dict) else {}
    target = extra.get("target")
    if isinstance(target, dict):
        width, height = target.get("width"), target.get("height")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            return width, height
    side = FAMILY_SIZES.get(plan.model_family or "", 512)
    return side, side
