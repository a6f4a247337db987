"""What the hook reads of the UI: its modules (`shared`, `devices`), the model, the card, the job's `p`.

Part of the hook (docs/architecture.md#the-hook): standard library, torch and the host's modules only.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any

from lowvram_hook import log
from lowvram_hook.config import HookConfig, load_from_env
from lowvram_hook.layout import MIB, CachePatch, TorchMover


class UiState:
    """The host's modules, the config file and the card, as the hook sees them (replaceable for tests)."""

    def __init__(self, *, torch_module: Any, shared: Any, devices: Any, cuda_namespace: Any, patch: CachePatch,
                 mover: Any, env: Mapping[str, str] | None) -> None:
        self.torch = torch_module
        self.shared = shared
        self.devices = devices
        self.cuda_namespace = cuda_namespace
        self.patch = patch  # the mover's moves respect it (no empty_cache while our layout holds)
        self._mover = mover
        self.env = env if env is not None else os.environ
        self._said: set[str] = set()
        self._cfg: HookConfig | None = None

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

    def cmd_opts(self) -> Any:
        return getattr(self.shared, "cmd_opts", None)

    def cuda(self) -> bool:
        try:
            return bool(self.mover.available())
        except Exception:
            return False

    def free_now_mb(self) -> int | None:
        """Dedicated VRAM free, counting what PyTorch holds cached but unused as free."""
        if not self.cuda():
            return None
        free, _total = self.mover.mem_get_info()
        cached = 0
        try:
            cached = max(0, self.mover.memory_reserved() - self.mover.memory_allocated())
        except Exception:
            pass
        return int((free + cached) // MIB)

    def device_type(self) -> str:
        """What the UI generates on: A1111's `devices.device` (`--use-cpu all` makes it cpu)."""
        kind = getattr(getattr(self.devices, "device", None), "type", None)
        if isinstance(kind, str) and kind:
            return kind
        return "cuda" if self.cuda() else "cpu"


def int_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def job_shape(p: Any) -> dict[str, Any]:
    """What the job's `p` asks for: size, batch, steps, hires (only its first pass is timed), images."""
    batch = int_attr(p, "batch_size")
    n_iter = int_attr(p, "n_iter")
    return {"width": int_attr(p, "width"), "height": int_attr(p, "height"), "batch": batch,
            "steps": int_attr(p, "steps"), "first_pass_only": bool(getattr(p, "enable_hr", False)),
            "images": max(1, batch or 1) * max(1, n_iter or 1)}


def weak_owner(p: Any) -> Any:
    """A weak reference to the job's `p` (None where it takes none)."""
    try:
        return weakref.ref(p)
    except TypeError:
        return None


def latent_size(x: Any) -> tuple[int, int] | None:
    """(width, height) of the latent the denoiser is called with (x is (batch, channels, h, w))."""
    shape = getattr(x, "shape", None)
    try:
        if shape is not None and len(shape) >= 3:
            return int(shape[-1]), int(shape[-2])
    except (TypeError, ValueError):
        pass
    return None
