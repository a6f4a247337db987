"""Which torch CUDA builds have kernels for which GPUs, and the build to install instead.

Facts (reference/vram_data.md §9; PyTorch's release notes and RFCs): the CUDA 12.6 wheels carry
kernels from sm_50 (Maxwell) up; from torch 2.8 the CUDA 12.8/12.9 wheels start at sm_70 (Maxwell
and Pascal dropped, pytorch/pytorch#157517), from 2.11 at sm_75 (Volta dropped too, #172352); the
CUDA 13 wheels start at sm_75. torch 2.7's cu128 wheels still had sm_50. torch 2.14 is the last
release with cu126 wheels. Pure: the world hands in the venv's torch and the card's capability.
"""

from __future__ import annotations

import re
import shlex

from packaging.version import InvalidVersion, Version

LEGACY_CUDA = "cu126"
LEGACY_INDEX = "https://download.pytorch.org/whl/cu126"
LAST_LEGACY_TORCH = "2.14.0"  # the last torch with cu126 wheels (reference/vram_data.md §9)
_LOCAL_CU = re.compile(r"\+cu(\d{2,3})$")


def cuda_of(torch: str | None, torch_cuda: str | None) -> tuple[int, int] | None:
    """The CUDA a torch was built for: its wheel's local version (`+cu130`) first, else torch/version.py's."""
    m = _LOCAL_CU.search(torch or "")
    if m:
        digits = m.group(1)
        return int(digits[:-1]), int(digits[-1])
    if torch and "+" in torch:  # +cpu, +rocm…: no CUDA, whatever else says so
        return None
    m2 = re.match(r"^\s*(\d+)\.(\d+)", torch_cuda or "")
    return (int(m2.group(1)), int(m2.group(2))) if m2 else None


def _release(torch: str | None) -> Version | None:
    try:
        return Version((torch or "").split("+", 1)[0])
    except InvalidVersion:
        return None


def min_cc(torch: str | None, cuda: tuple[int, int] | None) -> tuple[int, int] | None:
    """The oldest compute capability this torch build has kernels for; None where lowvram claims nothing."""
    if cuda is None:
        return None
    if cuda >= (13, 0):
        return (7, 5)
    if cuda >= (12, 8):
        release = _release(torch)
        if release is None or release >= Version("2.11"):
            return (7, 5)
        return (7, 0) if release >= Version("2.8") else None
    return None


def cc_text(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def cuda_text(cuda: tuple[int, int]) -> str:
    return f"CUDA {cuda[0]}.{cuda[1]}"


def no_kernels_for(torch: str | None, torch_cuda: str | None, cc: tuple[int, int] | None) -> tuple[int, int] | None:
    """The build's oldest capability where the card (`cc`) is older than it, else None (it runs, or unknown)."""
    floor = min_cc(torch, cuda_of(torch, torch_cuda))
    return floor if floor is not None and cc is not None and cc < floor else None


def legacy_build(torch: str | None) -> tuple[str, str]:
    """(torch, torchvision) of the CUDA 12.6 build to install instead: the same release where it has cu126
    wheels (up to 2.14), else 2.14.0. torchvision 0.(minor+15).patch pairs with torch 2.minor.patch."""
    release = _release(torch)
    if release is None or release > Version(LAST_LEGACY_TORCH) or release < Version("2.1"):
        release = Version(LAST_LEGACY_TORCH)
    major_minor_patch = (*release.release, 0, 0)[:3]
    base = ".".join(str(p) for p in major_minor_patch)
    vision = f"0.{major_minor_patch[1] + 15}.{major_minor_patch[2]}"
    return f"{base}+{LEGACY_CUDA}", f"{vision}+{LEGACY_CUDA}"


def legacy_pip_args(torch: str | None) -> str:
    """pip's arguments for that build (the exact local versions, so pip replaces a +cu130 of the same release)."""
    t, v = legacy_build(torch)
    return f"torch=={t} torchvision=={v} --index-url {LEGACY_INDEX}"


def venv_pip_command(python: str | None, os_name: str, torch: str | None) -> str:
    """The command that puts the legacy build into the UI's venv, with the venv's own Python."""
    exe = python or ("venv\\Scripts\\python.exe" if os_name == "windows" else "venv/bin/python")
    quoted = (f'"{exe}"' if " " in exe else exe) if os_name == "windows" else shlex.quote(exe)
    return f"{quoted} -m pip install {legacy_pip_args(torch)}"
