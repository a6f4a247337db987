"""When the hook lays out: a pending layout (a model load, a script reload, a switch to a cached
checkpoint), a config that asks for another one, a patch someone undid; and a failed layout not retried.

Part of the hook (docs/architecture.md#the-hook): standard library, torch and the host's modules only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from lowvram_hook import log
from lowvram_hook.config import HookConfig
from lowvram_hook.layout import MIB, LayoutResult, refusal, run_layout
from lowvram_hook.uistate import UiState


class LayoutSchedule:
    """The layout in force, the one pending, the one that failed, and the patch that keeps it."""

    def __init__(self, ui: UiState, *, clock: Callable[[], float], scan: bool) -> None:
        self.ui = ui
        self.patch = ui.patch
        self.clock = clock
        self.scan = scan
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

    def model_loaded(self, configured: bool) -> None:
        """A model load: lay out at the next job; read what is free while no reserve is held."""
        self.pending = True
        self.free_mb = None
        if configured and not self.patch.active:
            self.free_mb = self.ui.free_now_mb()

    def before_job(self, model: Any, cfg: HookConfig) -> None:
        """At the start of a job, when nothing samples: lay out when it is due, or lift the layout."""
        if model is not None and not self.same_model(model):
            self.pending = True
            self.free_mb = None
        if cfg.layout:
            wanted = cfg.layout_key
            if self.pending:
                self.failed_for = None
            stale = self.patch.active and not self.patch.intact()
            if self.pending or wanted not in (self.laid_out, self.failed_for) or stale:
                self.lay_out(model, cfg)
        else:
            self.undo("the config says layout: false")
            self.layout_error = None
        if model is not None:
            self.remember_model(model)
        self.pending = False
        if self.free_mb is None:
            self.free_mb = self.ui.free_now_mb()

    def take_layout_s(self) -> float | None:
        """The seconds of a layout no job has reported yet (the next job's record carries them)."""
        seconds, self.layout_s_unreported = self.layout_s_unreported, None
        return seconds

    def same_model(self, model: Any) -> bool:
        return self.model_ref is not None and model is not None and self.model_ref() is model

    def remember_model(self, model: Any) -> None:
        try:
            self.model_ref = weakref.ref(model)
        except TypeError:
            self.model_ref = lambda m=model: m  # never keeps more alive than the UI itself does

    def lay_out(self, model: Any, cfg: HookConfig) -> None:
        why = refusal(model, self.ui.mover, self.ui.cuda_namespace, self.ui.cmd_opts())
        if why is not None:
            self.undo(why)
            self.ui.say_once(f"layout skipped: {why}")
            self.laid_out = None
            self.layout_error = why
            return
        unet = model.model.diffusion_model
        result = run_layout(unet, cfg.reserve_mb, self.ui.mover, self.patch, order=cfg.order,
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

    def undo(self, why: str) -> None:
        """Lift our patch and hand a cached reserve back to the driver (giant-kitten's 'disable')."""
        if not self.patch.active and self.laid_out is None:
            return
        self.patch.lift()
        self.laid_out = None
        try:
            self.ui.mover.empty_cache()
        except Exception:
            pass
        log(f"layout undone: {why}")
