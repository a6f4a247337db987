"""What the hook records: the job it watches, its steps and peaks, and the record it appends.

A job that failed never reaches postprocess; `watch_close` wraps `p.close` on the instance so the
close that `with closing(p):` runs (A1111 1.6+) records it (docs/architecture.md#the-hook).
Part of the hook: standard library, torch and the host's modules only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowvram_hook import HOOK_VERSION
from lowvram_hook.config import HookConfig
from lowvram_hook.layout import MIB
from lowvram_hook.observe import (
    SharedUsageReader,
    StepTimer,
    append_record,
    model_checkpoint_key,
    model_family,
    overflow_estimate,
)
from lowvram_hook.schedule import LayoutSchedule
from lowvram_hook.uistate import UiState, job_shape, latent_size, weak_owner

PDH_INTERVAL_S = 0.25
LATENT_FACTOR = 8  # pixels per latent cell in every family the hook lays out (SD1.x, SD2, SDXL)
MAX_REASON = 400
CLOSE_MARK = "_lowvram_close"


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
    gpu_uuid: str | None = None  # the card's UUID (torch >= 2.2), so runs carry across UIs on this GPU


def exception_reason(exc: BaseException | None) -> str:
    """One line for the record; an OOM says so in words the policy looks for."""
    if exc is None:
        return "the job ended without reaching postprocess (no error was in flight)"
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_REASON]
    if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
        return f"out of memory (OOM): {text}"
    return text


def watch_close(p: Any, on_close: Callable[[Any], Any]) -> None:
    """Wrap `p.close` on the instance (chained, then put back) so a failed job is recorded:
    `on_close(p)` runs first, then the close the instance had."""
    try:
        current = p.close
        if not callable(current) or getattr(current, CLOSE_MARK, False):
            return
        had_own = "close" in vars(p)
    except Exception:  # no close, or no instance dict: the next-job fallback covers it
        return

    def close(*args: Any, **kwargs: Any) -> Any:
        try:
            on_close(p)
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


class Recorder:
    """The job in flight: started at `process()`, timed by the denoiser callbacks, recorded at its end."""

    def __init__(self, ui: UiState, schedule: LayoutSchedule, *, clock: Callable[[], float],
                 wall: Callable[[], float]) -> None:
        self.ui = ui
        self.schedule = schedule
        self.clock = clock
        self.wall = wall
        self.job: Job | None = None
        self.steps = StepTimer()
        self.shared_reader = SharedUsageReader()
        self._last_pdh = 0.0

    def denoiser_called(self, params: Any) -> None:
        if self.job is None:
            return
        now = self.clock()
        self.steps.call(now, denoiser=getattr(params, "denoiser", None),
                        sampling_step=getattr(params, "sampling_step", None),
                        total_steps=getattr(params, "total_sampling_steps", None),
                        latent=latent_size(getattr(params, "x", None)))
        if not self.shared_reader.failed and now - self._last_pdh >= PDH_INTERVAL_S:
            self._last_pdh = now
            self.sample_shared()

    def denoiser_ended(self) -> None:
        if self.job is not None:
            self.steps.call_ended(self.clock())

    def sample_shared(self) -> None:
        if self.job is None:
            return
        shared = self.shared_reader.read()
        if shared is not None:
            self.job.shared_peak = max(self.job.shared_peak or 0, shared)

    def start_job(self, p: Any, model: Any, cfg: HookConfig) -> None:
        self.steps.reset()
        ooms = non_torch = total = gpu_uuid = None
        if self.ui.cuda():
            mover = self.ui.mover
            gpu_uuid = read_gpu_uuid(mover)
            try:
                mover.reset_peaks()
                ooms = mover.num_ooms()
                free, total = mover.mem_get_info()
                non_torch = max(0, (total - free) - mover.memory_reserved())
            except Exception:
                pass
        layout_s = self.schedule.take_layout_s()
        laid_out = cfg.layout and self.schedule.laid_out is not None
        layout_error = None if laid_out or not cfg.layout else self.schedule.layout_error
        self.job = Job(started=self.clock(), ooms_at_start=ooms, non_torch=non_torch, total=total,
                       **job_shape(p), layout_s=layout_s, cfg=cfg,
                       checkpoint=model_checkpoint_key(model), family=model_family(model, cfg.family),
                       laid_out=laid_out, layout_error=layout_error, device=self.ui.device_type(),
                       owner=weak_owner(p), gpu_uuid=gpu_uuid)
        self.sample_shared()

    def take_job(self) -> Job | None:
        """The job in flight, no longer watched."""
        job, self.job = self.job, None
        return job

    def take_job_of(self, p: Any) -> Job | None:
        """The job in flight when it is `p`'s, no longer watched; otherwise None and it stays."""
        job = self.job
        if job is None or job.owner is None or job.owner() is not p:
            return None
        self.job = None
        return job

    def oom_since(self, job: Job) -> bool:
        """Whether the allocator counted an OOM since `job` started."""
        if job.ooms_at_start is None or not self.ui.cuda():
            return False
        try:
            ooms = self.ui.mover.num_ooms()
        except Exception:
            return False
        return bool(ooms > job.ooms_at_start)

    def record(self, job: Job, *, ok: bool, reason: str, peaks: bool = True) -> None:
        cfg = job.cfg
        memory = read_memory(self.ui, job, peaks)
        elapsed = self.clock() - job.started
        latent = None
        if job.width and job.height:
            latent = (job.width // LATENT_FACTOR, job.height // LATENT_FACTOR)
        now = self.wall()
        sit = self.steps.seconds_per_iteration(job.first_pass_only, latent)
        record = job_record(job, memory, ok=ok, reason=reason, now=now, elapsed=elapsed,
                            free_mb=self.schedule.free_mb, sit=sit)
        try:
            append_record(cfg.observations, record)
        except (OSError, ValueError) as exc:
            self.ui.say_once(f"cannot record the observation in {cfg.observations}: {exc}")


def read_gpu_uuid(mover: Any) -> str | None:
    """The card's UUID from the mover (TorchMover.gpu_uuid), None where it cannot say (torch < 2.2, a fake)."""
    try:
        read = getattr(mover, "gpu_uuid", None)
        uuid = read() if callable(read) else None
    except Exception:
        return None
    return uuid if isinstance(uuid, str) else None


def read_memory(ui: UiState, job: Job, peaks: bool) -> dict[str, Any]:
    """The allocator's readings for the record, taken now (at the job's end or failure)."""
    peak_alloc = peak_reserved = ooms = None
    overflow = overflow_source = None
    if ui.cuda():
        try:
            if peaks:
                peak_alloc, peak_reserved = ui.mover.peaks()
            if job.ooms_at_start is not None:
                ooms = max(0, ui.mover.num_ooms() - job.ooms_at_start)
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


def job_record(job: Job, memory: dict[str, Any], *, ok: bool, reason: str, now: float, elapsed: float,
               free_mb: int | None, sit: float | None) -> dict[str, Any]:
    """The record lowvram/core/observations.py reads (schema 1; its fields and order do not change)."""
    cfg = job.cfg
    ooms = memory["ooms"]
    return {
        "schema": 1,
        "time": now,
        "source": "hook",
        "checkpoint": job.checkpoint,
        "family": job.family,
        "flags": list(cfg.flags),
        "road": cfg.road,
        "offload": cfg.offload,
        "layout": job.laid_out,
        "layout_error": job.layout_error,
        "reserve_mb": cfg.reserve_mb if job.laid_out else None,
        "free_mb": free_mb,
        **memory,
        "vram_total_mb": None if job.total is None else int(job.total // MIB),
        "sit": sit,
        "wall_s": max(0.0, elapsed) / job.images if job.images else None,
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
        "gpu_uuid": job.gpu_uuid,
    }
