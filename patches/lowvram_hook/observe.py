"""What the hook measures and how it records it (DESIGN.md §7 "Records").

Each record is one JSON line appended with a single write() on an O_APPEND descriptor, the same
format lowvram/observations.py reads (this module cannot import it: the hook runs in the UI's
Python). Overflow is the Windows "Shared Usage" PDH counter of this process where it can be read,
else `max(0, peak reserved + non-torch use − dedicated total)`.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
from typing import Any

MIB = 1024 * 1024


def checkpoint_key(filename: str) -> str | None:
    """name|size|mtime, exactly as lowvram.markers.checkpoint_key (A1111's sha256 is lazy/optional)."""
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


class StepTimer:
    """Per-step times from on_cfg_denoiser: (sampling_step, time) of each step's first call.

    A sampler may call the denoiser twice per step (Heun, DPM2): only the first call counts. A step
    number going down starts a new pass (hires fix's second pass, or the next batch of n_iter).
    """

    def __init__(self) -> None:
        self.passes: list[list[tuple[int, float]]] = [[]]
        self.last: int | None = None

    def reset(self) -> None:
        self.passes = [[]]
        self.last = None

    def tick(self, step: int, now: float) -> None:
        if self.last is not None and step == self.last:
            return
        if self.last is not None and step < self.last:
            self.passes.append([])
        self.passes[-1].append((step, now))
        self.last = step

    def seconds_per_iteration(self, first_pass_only: bool = False) -> float | None:
        deltas: list[float] = []
        for ticks in self.passes[:1] if first_pass_only else self.passes:
            for (s1, t1), (s2, t2) in itertools.pairwise(ticks):
                if s2 > s1 and t2 >= t1:
                    deltas.append((t2 - t1) / (s2 - s1))
        return statistics.median(deltas) if deltas else None


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
