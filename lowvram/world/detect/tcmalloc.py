"""Which TCMalloc library `LD_PRELOAD` should name, whether it is usable, or what to install.

docs/architecture.md#detection: from `ldconfig -p` take `libtcmalloc_minimal.so.N`, else `libtcmalloc.so.N`, for this
machine's architecture only; never `_debug` or `_and_profiler` (Debian lists a `_debug` variant
first); the file must exist; on glibc < 2.34 it must be linked to libpthread, or preloading it
fails with "undefined symbol: pthread_key_create". The parsing is pure so tests feed it text.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lowvram.core.facts import SystemFacts, TcmallocFacts
from lowvram.world.detect.system import os_release

NAME_RE = re.compile(r"^libtcmalloc(_minimal)?\.so\.\d+$")
LINE_RE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s*=>\s*(\S.*?)\s*$")
# platform.machine() -> the tag ldconfig prints in "(libc6,x86-64)".
ARCH_TAGS = {
    "x86_64": "x86-64",
    "amd64": "x86-64",
    "aarch64": "AArch64",
    "arm64": "AArch64",
    "ppc64le": "64bit",
    "s390x": "64bit",
    "riscv64": "RISC-V",
}
KNOWN_TAGS = {"x86-64", "AArch64", "64bit", "x32", "hard-float", "soft-float", "RISC-V", "IA-64", "N32"}
SUBPROCESS_TIMEOUT_S = 2.0
PTHREAD_BUILTIN_GLIBC = (2, 34)

# /etc/os-release ID / ID_LIKE -> the package that ships libtcmalloc_minimal.so.N
PACKAGES = {
    "debian": ("libtcmalloc-minimal4", "sudo apt install libtcmalloc-minimal4"),
    "ubuntu": ("libtcmalloc-minimal4", "sudo apt install libtcmalloc-minimal4"),
    "fedora": ("gperftools-libs", "sudo dnf install gperftools-libs"),
    "rhel": ("gperftools-libs", "sudo dnf install gperftools-libs"),
    "centos": ("gperftools-libs", "sudo dnf install gperftools-libs"),
    "arch": ("gperftools", "sudo pacman -S gperftools"),
}


@dataclass(frozen=True)
class LdconfigEntry:
    name: str
    flags: str
    path: str


def parse_ldconfig(text: str) -> list[LdconfigEntry]:
    entries = []
    for line in text.splitlines():
        m = LINE_RE.match(line)
        if m:
            entries.append(LdconfigEntry(m.group(1), m.group(2), m.group(3)))
    return entries


def _arch_matches(flags: str, arch: str | None) -> bool:
    tags = {part.strip() for part in flags.split(",")[1:]}
    want = ARCH_TAGS.get((arch or "").lower())
    if want is not None:
        return want in tags
    # Unknown or 32-bit machine: only entries without a 64-bit/ABI tag ("(libc6)").
    return not (tags & KNOWN_TAGS)


def candidates(text: str, arch: str | None) -> list[LdconfigEntry]:
    """TCMalloc libraries for this architecture, best first: _minimal, then the full one."""
    found = [e for e in parse_ldconfig(text) if NAME_RE.match(e.name) and _arch_matches(e.flags, arch)]
    return sorted(found, key=lambda e: 0 if "_minimal" in e.name else 1)


# ---------------------------------------------------------------------------------------------
# libpthread linkage (glibc < 2.34)


def elf_needed(path: Path) -> list[str] | None:
    """DT_NEEDED entries of an ELF shared object, or None when it cannot be read as one."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(64 * 1024 * 1024)
    except OSError:
        return None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    try:
        if is64:
            phoff, = struct.unpack_from(end + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
        else:
            phoff, = struct.unpack_from(end + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
        loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            base = phoff + i * phentsize
            if is64:
                p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(end + "IIQQQQ", data, base)
            else:
                p_type, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(end + "IIIII", data, base)
            if p_type == 1:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []
        fmt, size = (end + "qQ", 16) if is64 else (end + "iI", 8)
        needed: list[int] = []
        strtab = None
        for off in range(dynamic[0], dynamic[0] + dynamic[1], size):
            tag, val = struct.unpack_from(fmt, data, off)
            if tag == 0:
                break
            if tag == 1:
                needed.append(val)
            elif tag == 5:
                strtab = val
        if strtab is None:
            return None
        str_off = next((o + strtab - v for v, o, s in loads if v <= strtab < v + s), None)
        if str_off is None:
            return None
        names = []
        for n in needed:
            start = str_off + n
            stop = data.index(b"\0", start)
            names.append(data[start:stop].decode("utf-8", "replace"))
        return names
    except (struct.error, ValueError):
        return None


def links_libpthread(path: Path) -> bool | None:
    """True/False from the ELF itself; `ldd` (with a timeout) where that cannot be read; None unknown."""
    needed = elf_needed(path)
    if needed is not None:
        return any(n.startswith("libpthread.so") for n in needed)
    try:
        proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return "libpthread" in proc.stdout if proc.returncode == 0 else None


def _glibc_tuple(glibc: str | None) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", glibc or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------


def package_for(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """(package, install command) for this distribution, from os-release ID and ID_LIKE."""
    rel = os_release(root)
    ids = [rel.get("ID", ""), *rel.get("ID_LIKE", "").split()]
    for ident in ids:
        if ident.lower() in PACKAGES:
            return PACKAGES[ident.lower()]
    return None, None


def run_ldconfig() -> str | None:
    env = dict(os.environ)
    env["PATH"] = "/sbin:/usr/sbin:" + env.get("PATH", "")
    try:
        proc = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, env=env,
                              timeout=SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def probe_tcmalloc(system: SystemFacts, ldconfig_text: str | None = None, root: Path = Path("/")) -> TcmallocFacts:
    if system.os != "linux":
        return TcmallocFacts(usable=False, reason=f"TCMalloc preloading is Linux-only (webui.sh); not used on {system.os}")
    package, _command = package_for(root)
    missing_reason = "no libtcmalloc_minimal.so / libtcmalloc.so for this architecture in `ldconfig -p`"
    text = ldconfig_text if ldconfig_text is not None else run_ldconfig()
    if text is None:
        return TcmallocFacts(usable=False, reason="`ldconfig -p` could not be run", package=package)
    found = candidates(text, system.arch)
    if not found:
        return TcmallocFacts(usable=False, reason=missing_reason, package=package)
    glibc = _glibc_tuple(system.glibc)
    problems = []
    for entry in found:
        path = Path(entry.path)
        if not path.is_file():
            problems.append(f"{entry.path} is listed by ldconfig but missing")
            continue
        if glibc is not None and glibc < PTHREAD_BUILTIN_GLIBC:
            linked = links_libpthread(path)
            if linked is False:
                problems.append(f"{entry.path} is not linked to libpthread (needed on glibc {system.glibc})")
                continue
        return TcmallocFacts(library=entry.path, usable=True,
                             reason=f"{entry.name} for {system.arch or 'this machine'}", package=package)
    return TcmallocFacts(usable=False, reason="; ".join(problems), package=package)
