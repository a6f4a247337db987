"""NVIDIA GPUs through NVML (nvidia-ml-py). The only module that imports `pynvml`.

Every call goes through the module attribute `pynvml`, so tests swap in a fake that raises the
real `pynvml.NVMLError_*` classes. Each field is read on its own: a field the driver does not
support (NotSupported, FunctionNotFound on an old driver, Unknown) loses only that field and is
noted in `GpuFacts.errors`; GpuIsLost marks that GPU lost and stops reading it. No driver at all
is a normal answer, returned as the reason there are no GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from lowvram.core.facts import GpuFacts

MIB = 1024 * 1024
T = TypeVar("T")


class _LostError(Exception):
    """The GPU fell off the bus while it was being read."""


def _error_name(exc: BaseException) -> str:
    name = type(exc).__name__
    if name.startswith("NVMLError_"):
        return name[len("NVMLError_"):]
    return str(exc) or name


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip("\x00").strip()
    return str(value).strip()


def cuda_version_text(value: int) -> str:
    """NVML's integer CUDA driver version (12030) as text ("12.3")."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _init_failure(exc: BaseException) -> str:
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "NVIDIA driver not found (NVML library missing)"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "NVIDIA driver not loaded (the kernel module is not running)"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to talk to the NVIDIA driver"
    if isinstance(exc, pynvml.NVMLError_LibRmVersionMismatch):
        return "NVIDIA driver and its library do not match (reboot after the driver update)"
    return f"NVML failed to start: {_error_name(exc)}"


def _memory(handle: Any) -> Any:
    """Memory info v2 (excludes the driver's reservation from `used`), else v1 on old drivers."""
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch, TypeError):
            pass
    return pynvml.nvmlDeviceGetMemoryInfo(handle)


class _Reader:
    """Reads one field at a time, recording what failed instead of giving up."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def read(self, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except pynvml.NVMLError_GpuIsLost as exc:
            self.errors.append(f"{what}: GpuIsLost")
            raise _LostError from exc
        except pynvml.NVMLError as exc:
            self.errors.append(f"{what}: {_error_name(exc)}")
            return None
        except (ValueError, TypeError, AttributeError, UnicodeError, OSError) as exc:
            # A binding/driver mismatch (odd bytes in a name, a struct field missing): lose this field only.
            self.errors.append(f"{what}: {type(exc).__name__}")
            return None


def _speed_facts(r: _Reader, handle: Any, fields: dict[str, Any]) -> None:
    """CUDA cores, the SM clock's maximum and the link's maximum generation and width (the current
    link drops to Gen 1 when the card idles, so the bandwidth comes from the maximum)."""
    for key, fn, *args in (
        ("cuda_cores", pynvml.nvmlDeviceGetNumGpuCores),
        ("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM),
        ("pcie_gen_max", pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
        ("pcie_width_max", pynvml.nvmlDeviceGetMaxPcieLinkWidth),
    ):
        value = r.read(key, fn, handle, *args)
        fields[key] = int(value) if value is not None else None


def _probe_one(index: int, driver: str | None, cuda_driver: str | None) -> GpuFacts:
    r = _Reader()
    fields: dict[str, Any] = {}
    lost = False
    try:
        handle = r.read("handle", pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return GpuFacts(index=index, driver=driver, cuda_driver=cuda_driver, lost=True, errors=tuple(r.errors))
        name = r.read("name", pynvml.nvmlDeviceGetName, handle)
        fields["name"] = _text(name) if name is not None else None
        uuid = r.read("uuid", pynvml.nvmlDeviceGetUUID, handle)
        fields["uuid"] = _text(uuid) if uuid is not None else None
        mem = r.read("memory", _memory, handle)
        if mem is not None:
            fields["vram_total_mb"] = int(mem.total) // MIB
            fields["vram_free_mb"] = int(mem.free) // MIB
            fields["vram_used_mb"] = int(mem.used) // MIB
        cc = r.read("compute_capability", pynvml.nvmlDeviceGetCudaComputeCapability, handle)
        if cc is not None:
            fields["compute_capability"] = f"{int(cc[0])}.{int(cc[1])}"
        gen = r.read("pcie_gen", pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
        fields["pcie_gen"] = int(gen) if gen is not None else None
        width = r.read("pcie_width", pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
        fields["pcie_width"] = int(width) if width is not None else None
        _speed_facts(r, handle, fields)
    except _LostError:
        lost = True
    return GpuFacts(index=index, driver=driver, cuda_driver=cuda_driver, lost=lost, errors=tuple(r.errors), **fields)


def probe_gpus() -> tuple[tuple[GpuFacts, ...], str | None]:
    """The NVIDIA GPUs in NVML (PCI) order, and why there are none when there are none."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return (), _init_failure(exc)
    except OSError as exc:  # a broken libnvidia-ml that cannot even be loaded
        return (), f"NVIDIA driver library cannot be loaded: {exc}"
    try:
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            return (), f"NVML cannot count GPUs: {_error_name(exc)}"
        if count == 0:
            return (), "the NVIDIA driver sees no GPU"
        driver: str | None
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            driver = None
        cuda_driver: str | None
        try:
            cuda_driver = cuda_version_text(int(pynvml.nvmlSystemGetCudaDriverVersion()))
        except pynvml.NVMLError:
            cuda_driver = None
        return tuple(_probe_one(i, driver, cuda_driver) for i in range(count)), None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
