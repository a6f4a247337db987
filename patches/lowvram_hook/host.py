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

Every entry point is wrapped: an exception in the hook is logged, never raised into the UI.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lowvram_hook import HOOK_VERSION, log
from lowvram_hook.config import HookConfig, hook_disabled, load_from_env
from lowvram_hook.layout import MIB, CachePatch, LayoutResult, TorchMover, refusal, run_layout
from lowvram_hook.observe import (
    SharedUsageReader,
    StepTimer,
    append_record,
    model_checkpoint_key,
    model_family,
    overflow_estimate,
)

PDH_INTERVAL_S = 0.25
LATENT_FACTOR = 8  # pixels per latent cell in every family the hook lays out (SD1.x, SD2, SDXL)
MAX_REASON = 400
CLOSE_MARK = "_lowvram_close"


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


@dataclass
class Job:
    started: float
    ooms_at_start: int | None
    non_torch: int | None
    total: int | None
    width: int | None
    height: int | None
    batch: int | None
    steps: int | None
    first_pass_only: bool
    layout_s: float | None
    cfg: HookConfig
    shared_peak: int | None = None
    # Taken when the job starts: an OOM'd job may be recorded at the *next* job, by when the user may
    # have switched checkpoints or configs, and its record must describe the job that ran.
    checkpoint: str | None = None
    family: str | None = None
    laid_out: bool = False
    layout_error: str | None = None  # why the layout the config asked for is not in force
    images: int | None = None
    device: str | None = None
    owner: Any = None  # weak reference to the job's `p`, so a close of another p is not taken for it


def exception_reason(exc: BaseException | None) -> str:
    """One line for the record; an OOM says so in words the policy looks for."""
    if exc is None:
        return "the job ended without reaching postprocess (no error was in flight)"
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_REASON]
    if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
        return f"out of memory (OOM): {text}"
    return text


def _latent_size(x: Any) -> tuple[int, int] | None:
    """(width, height) of the latent the denoiser is called with (x is (batch, channels, h, w))."""
    shape = getattr(x, "shape", None)
    try:
        if shape is not None and len(shape) >= 3:
            return int(shape[-1]), int(shape[-2])
    except (TypeError, ValueError):
        pass
    return None


def _int_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


class Hook:
    """One per UI process (module-level singleton in `install()`), surviving script reloads."""

    def __init__(self, *, torch_module: Any, shared: Any = None, devices: Any = None, cuda_namespace: Any = None,
                 mover: Any = None, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.perf_counter, wall: Callable[[], float] = time.time,
                 scan: bool = True) -> None:
        self.torch = torch_module
        self.shared = shared
        self.devices = devices
        self.cuda_namespace = cuda_namespace if cuda_namespace is not None else torch_module.cuda
        self.patch = CachePatch(self.cuda_namespace)
        self._mover = mover
        self.env = env if env is not None else os.environ
        self.clock = clock
        self.wall = wall
        self.scan = scan
        self.lock = threading.RLock()
        self.pending = False
        self.model_ref: Callable[[], Any] | None = None
        self.laid_out: tuple[int, str, bool] | None = None  # HookConfig.layout_key of the layout in force
        self.layout_error: str | None = None  # why the layout the config asks for is not in force
        # (reserve_mb, order) whose layout failed on this model: not retried at every job (each try
        # copies the whole model out and back), only once the model or the config changes.
        self.failed_for: tuple[int, str, bool] | None = None
        self.free_mb: int | None = None  # free dedicated VRAM for the current model load
        self.last_layout: LayoutResult | None = None
        self.layout_s_unreported: float | None = None
        self.job: Job | None = None
        self.steps = StepTimer()
        self.shared_reader = SharedUsageReader()
        self._last_pdh = 0.0
        self._said: set[str] = set()
        self._cfg: HookConfig | None = None

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def mover(self) -> Any:
        if self._mover is None:
            device = getattr(self.devices, "device", None)
            self._mover = TorchMover(device, self.patch)
        return self._mover

    def say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log(message)

    def config(self) -> HookConfig | None:
        cfg, why = load_from_env(self.env)
        if cfg is None:
            self.say_once(f"doing nothing: {why}")
        else:  # usable again: a later breakage is worth saying again
            self._said = {m for m in self._said if not m.startswith("doing nothing")}
        self._cfg = cfg
        return cfg

    def current_model(self, p: Any = None) -> Any:
        model = getattr(p, "sd_model", None) if p is not None else None
        if model is None and self.shared is not None:
            model = getattr(self.shared, "sd_model", None)
        return model

    def _same_model(self, model: Any) -> bool:
        return self.model_ref is not None and model is not None and self.model_ref() is model

    def _remember_model(self, model: Any) -> None:
        try:
            self.model_ref = weakref.ref(model)
        except TypeError:
            self.model_ref = lambda m=model: m  # never keeps more alive than the UI itself does

    def _cuda(self) -> bool:
        try:
            return bool(self.mover.available())
        except Exception:
            return False

    def _free_now_mb(self) -> int | None:
        """Dedicated VRAM free, counting what PyTorch holds cached but unused as free."""
        if not self._cuda():
            return None
        free, _total = self.mover.mem_get_info()
        cached = 0
        try:
            cached = max(0, self.mover.memory_reserved() - self.mover.memory_allocated())
        except Exception:
            pass
        return int((free + cached) // MIB)

    # -- callbacks ------------------------------------------------------------------------------

    @guarded
    def on_model_loaded(self, sd_model: Any) -> None:
        with self.lock:
            self.pending = True
            self.free_mb = None
            if self.config() is not None and not self.patch.active:
                self.free_mb = self._free_now_mb()

    @guarded
    def on_script_unloaded(self) -> None:
        """A UI reload re-imports every extension: lift the patch first, so one that saves
        `torch.cuda.empty_cache` at import (giant-kitten) saves the real one, not our no-op."""
        with self.lock:
            self._undo("the UI is reloading its scripts")
            self.pending = True

    @guarded
    def on_cfg_denoiser(self, params: Any) -> None:
        if self.job is None:
            return
        now = self.clock()
        self.steps.call(now, denoiser=getattr(params, "denoiser", None),
                        sampling_step=getattr(params, "sampling_step", None),
                        total_steps=getattr(params, "total_sampling_steps", None),
                        latent=_latent_size(getattr(params, "x", None)))
        if not self.shared_reader.failed and now - self._last_pdh >= PDH_INTERVAL_S:
            self._last_pdh = now
            self._sample_shared()

    @guarded
    def on_cfg_after_cfg(self, params: Any) -> None:
        """The end of a denoiser call (A1111 1.3+): the end of a 1-step job's only step."""
        if self.job is not None:
            self.steps.call_ended(self.clock())

    def _sample_shared(self) -> None:
        if self.job is None:
            return
        shared = self.shared_reader.read()
        if shared is not None:
            self.job.shared_peak = max(self.job.shared_peak or 0, shared)

    @guarded
    def process(self, p: Any) -> None:
        with self.lock:
            self._close_unfinished_job()
            cfg = self.config()
            if cfg is None:
                self._undo("the hook is off")
                return
            model = self.current_model(p)
            if model is not None and not self._same_model(model):
                self.pending = True
                self.free_mb = None
            if cfg.layout:
                wanted = cfg.layout_key
                if self.pending:
                    self.failed_for = None
                stale = self.patch.active and not self.patch.intact()
                if self.pending or wanted not in (self.laid_out, self.failed_for) or stale:
                    self._layout(model, cfg)
            else:
                self._undo("the config says layout: false")
                self.layout_error = None
            if model is not None:
                self._remember_model(model)
            self.pending = False
            if self.free_mb is None:
                self.free_mb = self._free_now_mb()
            self._start_job(p, model, cfg)
            self._watch_close(p)

    @guarded
    def postprocess(self, p: Any, processed: Any = None) -> None:
        with self.lock:
            job, self.job = self.job, None
            if job is None:
                return
            self._sample_shared()
            self._record(job, ok=True, reason="")

    @guarded
    def job_closed(self, p: Any) -> None:
        """`p.close()` came: when this p's job never reached postprocess, it failed; record it now,
        with the exception in flight (`closing.__exit__` runs inside the `except` of the with)."""
        with self.lock:
            job = self.job
            if job is None or job.owner is None or job.owner() is not p:
                return
            self.job = None
            self._sample_shared()
            self._record(job, ok=False, reason=exception_reason(sys.exc_info()[1]))

    def _watch_close(self, p: Any) -> None:
        """Wrap `p.close` on the instance (chained, then put back) so a failed job is recorded."""
        try:
            current = p.close
            if not callable(current) or getattr(current, CLOSE_MARK, False):
                return
            had_own = "close" in vars(p)
        except Exception:  # no close, or no instance dict: the next-job fallback covers it
            return
        hook = self

        def close(*args: Any, **kwargs: Any) -> Any:
            try:
                hook.job_closed(p)
            finally:
                try:
                    if vars(p).get("close") is close:
                        if had_own:
                            p.close = current
                        else:
                            del p.close
                except Exception:
                    pass
            return current(*args, **kwargs)

        setattr(close, CLOSE_MARK, True)
        try:
            p.close = close
        except Exception:
            pass

    # -- the layout -----------------------------------------------------------------------------

    def _layout(self, model: Any, cfg: HookConfig) -> None:
        cmd_opts = getattr(self.shared, "cmd_opts", None)
        why = refusal(model, self.mover, self.cuda_namespace, cmd_opts)
        if why is not None:
            self._undo(why)
            self.say_once(f"layout skipped: {why}")
            self.laid_out = None
            self.layout_error = why
            return
        unet = model.model.diffusion_model
        result = run_layout(unet, cfg.reserve_mb, self.mover, self.patch, order=cfg.order,
                            model_first=cfg.model_first, scan=self.scan,
                            clock=self.clock)
        self.last_layout = result
        self.failed_for = None if result.ok else cfg.layout_key
        self.layout_error = None if result.ok else (result.reason or "the layout failed")
        if result.ok:
            self.laid_out = cfg.layout_key
            self.free_mb = result.free_mb
            self.layout_s_unreported = result.seconds
            log(f"layout done: reserve {cfg.reserve_mb} MiB, {result.moved_bytes / MIB:.0f} MiB in "
                f"{result.groups} storages moved ({result.unet_groups} UNet) in {result.seconds:.2f} s, "
                f"free before it {result.free_mb} MiB")
        else:
            self.laid_out = None
            log(f"layout failed and was rolled back: {result.reason} (not retried until the model or the "
                "reserve changes)")

    def _undo(self, why: str) -> None:
        """Lift our patch and hand a cached reserve back to the driver (giant-kitten's 'disable')."""
        if not self.patch.active and self.laid_out is None:
            return
        self.patch.lift()
        self.laid_out = None
        try:
            self.mover.empty_cache()
        except Exception:
            pass
        log(f"layout undone: {why}")

    # -- jobs and records -----------------------------------------------------------------------

    def _device_type(self) -> str:
        """What the UI generates on: A1111's `devices.device` (`--use-cpu all` makes it cpu)."""
        kind = getattr(getattr(self.devices, "device", None), "type", None)
        if isinstance(kind, str) and kind:
            return kind
        return "cuda" if self._cuda() else "cpu"

    def _start_job(self, p: Any, model: Any, cfg: HookConfig) -> None:
        self.steps.reset()
        ooms = non_torch = total = None
        if self._cuda():
            mover = self.mover
            try:
                mover.reset_peaks()
                ooms = mover.num_ooms()
                free, total = mover.mem_get_info()
                non_torch = max(0, (total - free) - mover.memory_reserved())
            except Exception:
                pass
        layout_s, self.layout_s_unreported = self.layout_s_unreported, None
        laid_out = cfg.layout and self.laid_out is not None
        batch = _int_attr(p, "batch_size")
        n_iter = _int_attr(p, "n_iter")
        try:
            owner: Any = weakref.ref(p)
        except TypeError:
            owner = None
        self.job = Job(started=self.clock(), ooms_at_start=ooms, non_torch=non_torch, total=total,
                       width=_int_attr(p, "width"), height=_int_attr(p, "height"),
                       batch=batch, steps=_int_attr(p, "steps"),
                       first_pass_only=bool(getattr(p, "enable_hr", False)), layout_s=layout_s, cfg=cfg,
                       checkpoint=model_checkpoint_key(model), family=model_family(model, cfg.family),
                       laid_out=laid_out, layout_error=None if laid_out or not cfg.layout else self.layout_error,
                       images=max(1, batch or 1) * max(1, n_iter or 1), device=self._device_type(), owner=owner)
        self._sample_shared()

    def _close_unfinished_job(self) -> None:
        """A job whose postprocess and close never came (a host without `with closing(p)`): record
        it when the allocator counted an OOM. Its peaks are gone by now (A1111's memory monitor
        resets them when a UI job starts), so the record has none."""
        job, self.job = self.job, None
        if job is None or job.ooms_at_start is None or not self._cuda():
            return
        try:
            ooms = self.mover.num_ooms()
        except Exception:
            return
        if ooms > job.ooms_at_start:
            self._record(job, ok=False, reason="out of memory (OOM; the job did not finish)", peaks=False)

    def _memory(self, job: Job, peaks: bool) -> dict[str, Any]:
        """The allocator's readings for the record, taken now (at the job's end or failure)."""
        peak_alloc = peak_reserved = ooms = None
        overflow = overflow_source = None
        if self._cuda():
            try:
                if peaks:
                    peak_alloc, peak_reserved = self.mover.peaks()
                if job.ooms_at_start is not None:
                    ooms = max(0, self.mover.num_ooms() - job.ooms_at_start)
            except Exception:
                pass
        if job.shared_peak is not None:
            overflow, overflow_source = job.shared_peak, "pdh"
        elif peak_reserved is not None and job.total is not None and job.non_torch is not None:
            overflow, overflow_source = overflow_estimate(peak_reserved, job.non_torch, job.total), "estimate"
        return {
            "overflow_mb": None if overflow is None else int(overflow // MIB),
            "overflow_source": overflow_source,
            "peak_allocated_mb": None if peak_alloc is None else int(peak_alloc // MIB),
            "peak_reserved_mb": None if peak_reserved is None else int(peak_reserved // MIB),
            "ooms": ooms or 0,
        }

    def _record(self, job: Job, *, ok: bool, reason: str, peaks: bool = True) -> None:
        cfg = job.cfg
        memory = self._memory(job, peaks)
        ooms = memory["ooms"]
        wall = self.clock() - job.started
        latent = None
        if job.width and job.height:
            latent = (job.width // LATENT_FACTOR, job.height // LATENT_FACTOR)
        record = {
            "schema": 1,
            "time": self.wall(),
            "source": "hook",
            "checkpoint": job.checkpoint,
            "family": job.family,
            "flags": list(cfg.flags),
            "road": cfg.road,
            "offload": cfg.offload,
            "layout": job.laid_out,
            "layout_error": job.layout_error,
            "reserve_mb": cfg.reserve_mb if job.laid_out else None,
            "free_mb": self.free_mb,
            **memory,
            "vram_total_mb": None if job.total is None else int(job.total // MIB),
            "sit": self.steps.seconds_per_iteration(job.first_pass_only, latent),
            "wall_s": max(0.0, wall) / job.images if job.images else None,
            "images": job.images,
            "device": job.device,
            "width": job.width,
            "height": job.height,
            "batch": job.batch,
            "steps": job.steps,
            "ok": ok and not ooms,
            "reason": reason or ("out of memory (OOM) during the job" if ooms else ""),
            "driver": cfg.driver,
            "layout_s": job.layout_s,
            "tag": cfg.tag,
            "pid": os.getpid(),
            "hook_version": HOOK_VERSION,
        }
        try:
            append_record(cfg.observations, record)
        except (OSError, ValueError) as exc:
            self.say_once(f"cannot record the observation in {cfg.observations}: {exc}")


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
