"""What the hook measures and how it records it (docs/architecture.md#records).

Each record is one JSON line appended with a single write() on an O_APPEND descriptor, the same
format lowvram/core/observations.py reads (this module cannot import it: the hook runs in the UI's
Python). Overflow is the Windows "Shared Usage" PDH counter of this process where it can be read,
else `max(0, peak reserved + non-torch use − dedicated total)`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import weakref
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


def checkpoint_key(filename: str) -> str | None:
    """name|size|mtime, exactly as lowvram.core.markers.checkpoint_key (A1111's sha256 is lazy/optional)."""
    try:
        st = os.stat(filename)
    except OSError:
        return None
    return f"{os.path.basename(filename)}|{st.st_size}|{int(st.st_mtime)}"


def model_checkpoint_key(model: Any) -> str | None:
    info = getattr(model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None)
    return checkpoint_key(filename) if isinstance(filename, str) and filename else None


def model_family(model: Any, fallback: str | None) -> str | None:
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    if getattr(model, "is_sd1", False):
        return "sd15"
    return fallback


def append_record(path: str, record: dict[str, Any]) -> None:
    """One line, one write(): two UI processes appending at once still leave parseable lines."""
    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    try:
        written = os.write(fd, line)
    finally:
        os.close(fd)
    if written != len(line):
        raise OSError(f"short write ({written} of {len(line)} bytes)")


@dataclass
class SamplingPass:
    """One run of the sampler (a batch of n_iter, or hires fix's second pass) as the hook saw it."""

    starts: list[float]  # when each denoiser call began
    end: float | None = None  # when the latest call ended (on_cfg_after_cfg), if the host says
    steps: int | None = None  # sampling steps planned for this pass
    calls_per_step: int | None = None  # from the denoiser: 2 for Heun/DPM2 (total_steps / steps)
    latent: tuple[int, int] | None = None  # (width, height) of the latent, to tell hires passes apart
    key: Any = None  # the denoiser (weakly) that ran it, or None on hosts without params.denoiser
    last_index: int | None = None  # the denoiser's own call counter at the latest call
    last_step: int | None = None  # the host's sampling_step at the latest call (fallback)

    def seconds_per_step(self) -> float | None:
        """Elapsed time over the steps it covered, counted in denoiser calls, never in the host's
        `sampling_step` (A1111 1.8's lags one step: 0, 0, 1, …)."""
        n = len(self.starts)
        if not n:
            return None
        cps = self.calls_per_step or (max(1, round(n / self.steps)) if self.steps else 1)
        if self.end is not None and self.end >= self.starts[-1]:
            done: float = math.ceil(n / cps)  # Heun's last step is one call: 2N-1 calls are N steps
            if self.steps:
                done = min(done, self.steps)
            span = self.end - self.starts[0]
        else:  # no end of the last call: the steps between the first call and the last one
            done = (n - 1) / cps
            span = self.starts[-1] - self.starts[0]
        return span / done if done > 0 and span >= 0 else None


def _ref(obj: Any) -> Any:
    try:
        return weakref.ref(obj)  # never keep the sampler (and its latents) alive past the job
    except TypeError:
        return id(obj)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class StepTimer:
    """Seconds per sampling step from the timestamps of the denoiser calls (on_cfg_denoiser) and
    the end of the last one (on_cfg_after_cfg).

    A new pass starts when the denoiser object changes or its call counter restarts; on a host
    without `params.denoiser`, when `sampling_step` goes down, the planned steps or the latent
    size change.
    """

    def __init__(self) -> None:
        self.passes: list[SamplingPass] = []

    def reset(self) -> None:
        self.passes = []

    def _new_pass(self, key: Any, index: int | None, step: int | None, total: int | None,
                  latent: tuple[int, int] | None) -> bool:
        if not self.passes:
            return True
        cur = self.passes[-1]
        if latent is not None and cur.latent is not None and latent != cur.latent:
            return True
        if key is not None or cur.key is not None:
            if key is None or cur.key is None:
                return True
            same = cur.key() is key if isinstance(cur.key, weakref.ref) else cur.key == id(key)
            return not same or (index is not None and cur.last_index is not None and index <= cur.last_index)
        if step is not None and cur.last_step is not None and step < cur.last_step:
            return True
        return total is not None and cur.steps is not None and total != cur.steps

    def call(self, now: float, *, denoiser: Any = None, sampling_step: Any = None, total_steps: Any = None,
             latent: tuple[int, int] | None = None) -> None:
        """One denoiser call starts. `denoiser` is A1111 1.6+'s CFGDenoiser (`step`: calls so far this
        pass, `steps`, `total_steps`: calls expected); the rest is the fallback for other hosts."""
        index = steps = calls = None
        if denoiser is not None:
            index = _int_or_none(getattr(denoiser, "step", None))
            steps = _int_or_none(getattr(denoiser, "steps", None))
            calls = _int_or_none(getattr(denoiser, "total_steps", None))
        step = _int_or_none(sampling_step)
        total = _int_or_none(total_steps)
        if self._new_pass(denoiser, index, step, total if denoiser is None else None, latent):
            self.passes.append(SamplingPass([], latent=latent, key=None if denoiser is None else _ref(denoiser)))
        cur = self.passes[-1]
        cur.starts.append(now)
        cur.last_index, cur.last_step = index, step
        cur.steps = (steps or total) if denoiser is not None else total
        if steps and calls and calls >= steps:
            cur.calls_per_step = max(1, round(calls / steps))

    def call_ended(self, now: float) -> None:
        if self.passes and self.passes[-1].starts:
            self.passes[-1].end = now

    def seconds_per_iteration(self, first_pass_only: bool = False, latent: tuple[int, int] | None = None) -> float | None:
        """The median over the job's passes of the job's own size (hires fix's second pass is
        another size: its latent tells it apart; without latent sizes, `first_pass_only`)."""
        chosen = [p for p in self.passes if latent is not None and p.latent == latent]
        if not chosen:
            chosen = self.passes[:1] if first_pass_only else self.passes
        values = [v for v in (p.seconds_per_step() for p in chosen) if v is not None]
        return statistics.median(values) if values else None


def overflow_estimate(peak_reserved: int, non_torch: int, total: int) -> int:
    """Bytes that cannot have fit in dedicated memory: torch's peak + everyone else − the card."""
    return max(0, peak_reserved + max(0, non_torch) - total)


class SharedUsageReader:
    """This process's shared GPU memory from the Windows PDH counter (None elsewhere or on error).

    `\\GPU Process Memory(pid_<PID>_*)\\Shared Usage`: one instance per adapter (luid), summed.
    """

    PDH_FMT_LARGE = 0x00000400
    PDH_MORE_DATA = 0x800007D2

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.query: Any = None
        self.counter: Any = None
        self.failed = sys.platform != "win32"

    def _open(self) -> None:
        import ctypes
        from ctypes import wintypes

        pdh = ctypes.WinDLL("pdh")  # type: ignore[attr-defined]
        self._pdh = pdh
        query = wintypes.HANDLE()
        if pdh.PdhOpenQueryW(None, None, ctypes.byref(query)) != 0:
            raise OSError("PdhOpenQueryW failed")
        counter = wintypes.HANDLE()
        path = f"\\GPU Process Memory(pid_{self.pid}_*)\\Shared Usage"
        if pdh.PdhAddEnglishCounterW(query, path, None, ctypes.byref(counter)) != 0:
            pdh.PdhCloseQuery(query)
            raise OSError("PdhAddEnglishCounterW failed")
        self.query, self.counter = query, counter

    def read(self) -> int | None:
        if self.failed:
            return None
        try:
            import ctypes
            from ctypes import wintypes

            if self.query is None:
                self._open()

            class Value(ctypes.Structure):
                _fields_ = [("CStatus", wintypes.DWORD), ("largeValue", ctypes.c_longlong)]

            class Item(ctypes.Structure):
                _fields_ = [("szName", wintypes.LPWSTR), ("FmtValue", Value)]

            pdh = self._pdh
            if pdh.PdhCollectQueryData(self.query) != 0:
                return None
            size = wintypes.DWORD(0)
            count = wintypes.DWORD(0)
            status = pdh.PdhGetFormattedCounterArrayW(self.counter, self.PDH_FMT_LARGE, ctypes.byref(size),
                                                      ctypes.byref(count), None)
            if status & 0xFFFFFFFF != self.PDH_MORE_DATA or size.value == 0:
                return None
            buf = (ctypes.c_byte * size.value)()
            status = pdh.PdhGetFormattedCounterArrayW(self.counter, self.PDH_FMT_LARGE, ctypes.byref(size),
                                                      ctypes.byref(count), buf)
            if status != 0:
                return None
            items = ctypes.cast(buf, ctypes.POINTER(Item))
            return sum(max(0, int(items[i].FmtValue.largeValue)) for i in range(count.value))
        except Exception:
            self.failed = True
            return None
