"""The machine around the GPU: OS, WSL, RAM and swap, glibc, and GPUs that are not NVIDIA's.

Reads of /proc, /sys and /etc go through a `root` directory (default "/") so tests point them at a
tmp tree. Nothing here runs a subprocess without a timeout.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from lowvram.core.facts import OtherGpu, SystemFacts, derive_sysmem_fallback

MIB = 1024 * 1024
PCI_VENDORS = {"0x1002": "amd", "0x8086": "intel", "0x10de": "nvidia"}
WINDOWS_ADAPTER_TIMEOUT_S = 1.0


def host_os() -> str:
    name = platform.system().lower()
    if name.startswith(("cygwin", "msys", "win")):
        return "windows"
    return name if name in ("linux", "darwin") else name or "linux"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def os_release(root: Path = Path("/")) -> dict[str, str]:
    """/etc/os-release (or /usr/lib/os-release) as a dict, quotes removed."""
    for rel in ("etc/os-release", "usr/lib/os-release"):
        text = _read(Path(root) / rel)
        if text is None:
            continue
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.lstrip().startswith("#"):
                out[key.strip()] = value.strip().strip("\"'")
        return out
    return {}


def detect_wsl(root: Path = Path("/"), environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("WSL_DISTRO_NAME"):
        return True
    text = _read(Path(root) / "proc" / "version") or ""
    return "microsoft" in text.lower()


def glibc_version() -> str | None:
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        value = None
    if value and value.startswith("glibc "):
        return value.split()[1]
    lib, version = platform.libc_ver()
    return version if lib == "glibc" and version else None


def _os_version(os_name: str, root: Path) -> str | None:
    if os_name == "linux":
        rel = os_release(root)
        pretty = rel.get("PRETTY_NAME") or " ".join(x for x in (rel.get("NAME"), rel.get("VERSION_ID")) if x)
        kernel = platform.release()
        if pretty and kernel:
            return f"{pretty} (kernel {kernel})"
        return pretty or kernel or None
    if os_name == "darwin":
        return platform.mac_ver()[0] or platform.release() or None
    if os_name == "windows":
        return platform.version() or platform.release() or None
    return platform.release() or None


def meminfo(root: Path = Path("/")) -> tuple[int | None, int | None]:
    """(RAM, swap) in MiB from /proc/meminfo; (None, None) where it cannot be read."""
    text = _read(Path(root) / "proc" / "meminfo")
    if text is None:
        return None, None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * 1024 // MIB  # the kernel writes kB (KiB)
    return values.get("MemTotal"), values.get("SwapTotal")


def _psutil_memory() -> tuple[int | None, int | None]:
    import psutil

    try:
        ram: int | None = int(psutil.virtual_memory().total) // MIB
    except (OSError, RuntimeError):
        ram = None
    try:
        swap: int | None = int(psutil.swap_memory().total) // MIB
    except (OSError, RuntimeError):
        swap = None
    return ram, swap


def probe_system(driver: str | None = None, root: Path = Path("/"), os_name: str | None = None) -> SystemFacts:
    """OS, RAM, swap, glibc, WSL and what the driver does when VRAM runs out."""
    os_name = os_name or host_os()
    root = Path(root)
    wsl = os_name == "linux" and detect_wsl(root)
    # /proc/meminfo on Linux (what psutil reads there, without importing it: doctor's start-up time).
    ram_mb, swap_mb = meminfo(root) if os_name == "linux" and host_os() == "linux" else (None, None)
    if ram_mb is None:
        ram_mb, swap_mb = _psutil_memory()
    return SystemFacts(
        os=os_name,
        os_version=_os_version(os_name, root),
        arch=platform.machine() or None,
        ram_mb=ram_mb,
        swap_mb=swap_mb,
        glibc=glibc_version() if os_name == "linux" else None,
        wsl=wsl,
        sysmem_fallback=derive_sysmem_fallback(os_name, driver, wsl),
        cpu_count=os.cpu_count(),
    )


# ---------------------------------------------------------------------------------------------
# GPUs that are not NVIDIA's (docs/architecture.md#detection: no NVML does not mean no GPU)


def _drm_gpus(root: Path) -> tuple[OtherGpu, ...]:
    drm = Path(root) / "sys" / "class" / "drm"
    try:
        cards = sorted(p for p in drm.iterdir() if p.name.startswith("card") and p.name[4:].isdigit())
    except OSError:
        return ()
    seen: set[str] = set()
    found: list[OtherGpu] = []
    for card in cards:
        device = card / "device"
        vendor = (_read(device / "vendor") or "").strip().lower()
        kind = PCI_VENDORS.get(vendor)
        if kind is None or kind == "nvidia":
            continue
        try:
            key = str(device.resolve())
        except OSError:
            key = str(device)
        if key in seen:
            continue
        seen.add(key)
        product = (_read(device / "product_name") or "").strip()
        device_id = (_read(device / "device") or "").strip().lower()
        label = product or f"{'AMD' if kind == 'amd' else 'Intel'} GPU (PCI {vendor[2:]}:{device_id[2:] or '?'})"
        found.append(OtherGpu(vendor=kind, name=label))
    return tuple(found)


def classify_adapters(names: list[str]) -> tuple[OtherGpu, ...]:
    """Windows display adapter names → the ones that are AMD or Intel GPUs."""
    found: list[OtherGpu] = []
    for raw in names:
        name = raw.strip()
        low = name.lower()
        if not name or "nvidia" in low:
            continue
        if "amd" in low or "radeon" in low:
            found.append(OtherGpu("amd", name))
        elif "intel" in low:
            found.append(OtherGpu("intel", name))
    return tuple(found)


def _windows_adapters() -> tuple[OtherGpu, ...]:
    """The display adapters, from `wmic` with a 1 s limit; nothing when that is not possible."""
    try:
        proc = subprocess.run(["wmic", "path", "win32_VideoController", "get", "name"], capture_output=True,
                              text=True, timeout=WINDOWS_ADAPTER_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    if proc.returncode != 0:
        return ()
    lines = [ln for ln in proc.stdout.splitlines()[1:] if ln.strip()]
    return classify_adapters(lines)


def probe_other_gpus(root: Path = Path("/"), os_name: str | None = None, arch: str | None = None) -> tuple[OtherGpu, ...]:
    os_name = os_name or host_os()
    if os_name == "linux":
        return _drm_gpus(Path(root))
    if os_name == "darwin":
        machine = (arch or platform.machine()).lower()
        return (OtherGpu("apple", "Apple silicon GPU (Metal)"),) if machine in ("arm64", "aarch64") else ()
    if os_name == "windows":
        return _windows_adapters()
    return ()
