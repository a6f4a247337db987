"""The hook's life inside A1111: callbacks, the per-job script, the layout's timing, the records.

When it runs (docs/architecture.md#the-hook): A1111 loads the first model in a background thread and
fires `on_model_loaded` after the model is already visible to jobs, so laying out inside the
callback could race the first generation. The callback only marks the layout pending; the
AlwaysVisible script's `process()` runs it at the start of the next job, when nothing samples.
A switch to a checkpoint A1111 still has cached fires no callback, so `process()` also compares
the model object.

Records: `postprocess()` records a job that finished. A job that failed never reaches it, but A1111
1.6+ runs every job (UI and API) inside `with closing(p):`, so `process()` wraps `p.close` on the
instance: a close that comes before postprocess records the job as failed, with the exception in
flight and the allocator's peaks read then (A1111's memory monitor resets them when the next UI job
starts). On a host without that close, the next `process()` still records a job the allocator
counted an OOM for (`num_ooms`), without peaks.

The parts: `uistate.UiState` reads the UI (its modules, the model, the card, the config),
`schedule.LayoutSchedule` decides when to lay out and keeps the patch, `records.Recorder` watches
the job and appends its record. `Hook` wires them to the UI's callbacks and script.

Every entry point is wrapped: an exception in the hook is logged, never raised into the UI.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lowvram_hook import log
from lowvram_hook.config import HookConfig, hook_disabled
from lowvram_hook.layout import CachePatch
from lowvram_hook.records import (
    CLOSE_MARK,
    LATENT_FACTOR,
    MAX_REASON,
    PDH_INTERVAL_S,
    Job,
    Recorder,
    exception_reason,
    watch_close,
)
from lowvram_hook.schedule import LayoutSchedule
from lowvram_hook.uistate import UiState

__all__ = ["CLOSE_MARK", "LATENT_FACTOR", "MAX_REASON", "PDH_INTERVAL_S", "Hook", "Job", "accepts_name",
           "exception_reason", "guarded", "install", "register", "reset_for_tests"]


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Log an exception in one line and return None: the UI must keep working."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            log(f"{func.__name__} failed ({type(exc).__name__}: {exc}); the UI goes on without it")
            return None

    return wrapper


class _Part:
    """An attribute of the Hook kept by one of its parts (read and set through the hook as before)."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class Hook:
    """One per UI process (module-level singleton in `install()`), surviving script reloads."""

    # What the hook's callers and tests read and set on it, kept by its parts.
    torch, shared, devices, cuda_namespace = _Part("ui"), _Part("ui"), _Part("ui"), _Part("ui")
    patch, _mover, mover, env = _Part("ui"), _Part("ui"), _Part("ui"), _Part("ui")
    pending, model_ref, laid_out, layout_error = _Part("schedule"), _Part("schedule"), _Part("schedule"), _Part("schedule")
    failed_for, free_mb, last_layout, scan = _Part("schedule"), _Part("schedule"), _Part("schedule"), _Part("schedule")
    job, steps, shared_reader, clock, wall = (_Part("records"), _Part("records"), _Part("records"), _Part("records"),
                                              _Part("records"))

    def __init__(self, *, torch_module: Any, shared: Any = None, devices: Any = None, cuda_namespace: Any = None,
                 mover: Any = None, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.perf_counter, wall: Callable[[], float] = time.time,
                 scan: bool = True) -> None:
        cuda_namespace = cuda_namespace if cuda_namespace is not None else torch_module.cuda
        self.ui = UiState(torch_module=torch_module, shared=shared, devices=devices, cuda_namespace=cuda_namespace,
                          patch=CachePatch(cuda_namespace), mover=mover, env=env)
        self.schedule = LayoutSchedule(self.ui, clock=clock, scan=scan)
        self.records = Recorder(self.ui, self.schedule, clock=clock, wall=wall)
        self.lock = threading.RLock()

    # -- callbacks ------------------------------------------------------------------------------

    @guarded
    def on_model_loaded(self, sd_model: Any) -> None:
        with self.lock:
            self.schedule.model_loaded(self.ui.config() is not None)

    @guarded
    def on_script_unloaded(self) -> None:
        """A UI reload re-imports every extension: lift the patch first, so one that saves
        `torch.cuda.empty_cache` at import (giant-kitten) saves the real one, not our no-op."""
        with self.lock:
            self.schedule.undo("the UI is reloading its scripts")
            self.schedule.pending = True

    @guarded
    def on_cfg_denoiser(self, params: Any) -> None:
        self.records.denoiser_called(params)

    @guarded
    def on_cfg_after_cfg(self, params: Any) -> None:
        """The end of a denoiser call (A1111 1.3+): the end of a 1-step job's only step."""
        self.records.denoiser_ended()

    # -- the job's script ---------------------------------------------------------------------------

    @guarded
    def process(self, p: Any) -> None:
        with self.lock:
            self._close_unfinished_job()
            cfg = self.ui.config()
            if cfg is None:
                self.schedule.undo("the hook is off")
                return
            model = self.ui.current_model(p)
            self.schedule.before_job(model, cfg)
            self._start_job(p, model, cfg)
            watch_close(p, self.job_closed)

    @guarded
    def postprocess(self, p: Any, processed: Any = None) -> None:
        with self.lock:
            job = self.records.take_job()
            if job is None:
                return
            self.records.sample_shared()
            self._record(job, ok=True, reason="")

    @guarded
    def job_closed(self, p: Any) -> None:
        """`p.close()` came: when this p's job never reached postprocess, it failed; record it now,
        with the exception in flight (`closing.__exit__` runs inside the `except` of the with)."""
        with self.lock:
            job = self.records.take_job_of(p)
            if job is None:
                return
            self.records.sample_shared()
            self._record(job, ok=False, reason=exception_reason(sys.exc_info()[1]))

    def _start_job(self, p: Any, model: Any, cfg: HookConfig) -> None:
        self.records.start_job(p, model, cfg)

    def _close_unfinished_job(self) -> None:
        """A job whose postprocess and close never came (a host without `with closing(p)`): record
        it when the allocator counted an OOM. Its peaks are gone by now (A1111's memory monitor
        resets them when a UI job starts), so the record has none."""
        job = self.records.take_job()
        if job is not None and self.records.oom_since(job):
            self._record(job, ok=False, reason="out of memory (OOM; the job did not finish)", peaks=False)

    def _record(self, job: Job, *, ok: bool, reason: str, peaks: bool = True) -> None:
        self.records.record(job, ok=ok, reason=reason, peaks=peaks)


# -- installing into the host ----------------------------------------------------------------------

_HOOK: Hook | None = None


def accepts_name(register: Callable[..., Any]) -> bool:
    """1.9+ callbacks take `name=` (keyword-only); 1.8's take only the callback."""
    try:
        params = inspect.signature(register).parameters
    except (TypeError, ValueError):
        return False
    return "name" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def register(script_callbacks: Any, hook: Hook) -> list[str]:
    """Register the hook's callbacks where the host has them; returns the names registered."""
    done = []
    for what, callback in (("on_model_loaded", hook.on_model_loaded), ("on_cfg_denoiser", hook.on_cfg_denoiser),
                           ("on_cfg_after_cfg", hook.on_cfg_after_cfg),
                           ("on_script_unloaded", hook.on_script_unloaded)):
        register_fn = getattr(script_callbacks, what, None)
        if register_fn is None:
            log(f"the UI has no script_callbacks.{what}; that part of the hook is off")
            continue
        if accepts_name(register_fn):
            register_fn(callback, name=f"lowvram_layout_{what[3:]}")
        else:
            register_fn(callback)
        done.append(what)
    return done


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:
        log(f"cannot import {name} ({type(exc).__name__}: {exc})")
        return None


def install(env: Mapping[str, str] | None = None) -> tuple[Hook | None, Any]:
    """Called by scripts/lowvram_layout.py at import: (hook, the host's `modules.scripts`) or (None, None)."""
    global _HOOK
    env = os.environ if env is None else env
    if hook_disabled(env):
        log("hook off: LOWVRAM_HOOK=off")
        return None, None
    if not env.get("LOWVRAM_CONFIG", "").strip():
        log("hook off: LOWVRAM_CONFIG is not set (`lowvram apply` or `lowvram launch` sets it)")
        return None, None
    torch_module = _import("torch")
    script_callbacks = _import("modules.script_callbacks")
    scripts = _import("modules.scripts")
    if torch_module is None or script_callbacks is None or scripts is None:
        log("hook off: the host does not look like A1111 (see the import error above)")
        return None, None
    shared = _import("modules.shared")
    devices = _import("modules.devices")
    if _HOOK is None:
        _HOOK = Hook(torch_module=torch_module, shared=shared, devices=devices, env=env)
    else:
        _HOOK.shared, _HOOK.devices, _HOOK.env = shared, devices, env
    register(script_callbacks, _HOOK)
    return _HOOK, scripts


def reset_for_tests() -> None:
    global _HOOK
    if _HOOK is not None:
        _HOOK.patch.lift()
    _HOOK = None
