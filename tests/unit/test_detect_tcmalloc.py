"""TCMalloc: ldconfig parsing, docs/architecture.md#detection preference rules, glibc < 2.34 libpthread linkage, packages."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.core.facts import SystemFacts
from lowvram.world.detect import tcmalloc

LINUX = SystemFacts(os="linux", arch="x86_64", glibc="2.36")


def _elf(path: Path, needed: list[str]) -> Path:
    """A minimal 64-bit little-endian ELF shared object with DT_NEEDED entries."""
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
    offsets, pos = [], 1
    for n in needed:
        offsets.append(pos)
        pos += len(n) + 1
    ehdr_size, phdr_size = 64, 56
    phoff = ehdr_size
    str_off = phoff + 2 * phdr_size
    dyn_off = str_off + len(strtab) + (-len(strtab) % 8)
    dyn = b"".join(struct.pack("<qQ", 1, o) for o in offsets) + struct.pack("<qQ", 5, str_off) + struct.pack("<qQ", 0, 0)
    total = dyn_off + len(dyn)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, ehdr_size, phdr_size, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, total, total, 0x1000)
    dynamic = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dyn), len(dyn), 8)
    body = ehdr + load + dynamic + strtab + b"\0" * (-len(strtab) % 8) + dyn
    path.write_bytes(body)
    return path


def _ldconfig(*rows: tuple[str, str, Path | str]) -> str:
    lines = [f"{len(rows)} libs found in cache `/etc/ld.so.cache'"]
    lines += [f"\t{name} ({flags}) => {path}" for name, flags, path in rows]
    return "\n".join(lines) + "\n"


def test_minimal_preferred_debug_and_profiler_never(tmp_path: Path) -> None:
    debug = _elf(tmp_path / "libtcmalloc_debug.so.4", ["libc.so.6"])
    full = _elf(tmp_path / "libtcmalloc.so.4", ["libc.so.6"])
    minimal = _elf(tmp_path / "libtcmalloc_minimal.so.4", ["libc.so.6"])
    prof = _elf(tmp_path / "libtcmalloc_and_profiler.so.4", ["libc.so.6"])
    text = _ldconfig(("libtcmalloc_debug.so.4", "libc6,x86-64", debug), ("libtcmalloc_and_profiler.so.4", "libc6,x86-64", prof),
                     ("libtcmalloc.so.4", "libc6,x86-64", full), ("libtcmalloc_minimal.so.4", "libc6,x86-64", minimal))
    facts = tcmalloc.probe_tcmalloc(LINUX, ldconfig_text=text)
    assert facts.usable and facts.library == str(minimal)


def test_full_library_when_no_minimal(tmp_path: Path) -> None:
    full = _elf(tmp_path / "libtcmalloc.so.4", ["libc.so.6"])
    facts = tcmalloc.probe_tcmalloc(LINUX, ldconfig_text=_ldconfig(("libtcmalloc.so.4", "libc6,x86-64", full)))
    assert facts.usable and facts.library == str(full)


def test_other_architecture_is_ignored(tmp_path: Path) -> None:
    arm = _elf(tmp_path / "libtcmalloc_minimal.so.4", ["libc.so.6"])
    text = _ldconfig(("libtcmalloc_minimal.so.4", "libc6,AArch64", arm), ("libtcmalloc_minimal.so.4", "libc6", arm))
    facts = tcmalloc.probe_tcmalloc(LINUX, ldconfig_text=text)
    assert not facts.usable and facts.library is None
    arm_facts = tcmalloc.probe_tcmalloc(SystemFacts(os="linux", arch="aarch64", glibc="2.36"), ldconfig_text=text)
    assert arm_facts.usable


def test_listed_but_missing_file(tmp_path: Path) -> None:
    text = _ldconfig(("libtcmalloc_minimal.so.4", "libc6,x86-64", tmp_path / "gone.so"))
    facts = tcmalloc.probe_tcmalloc(LINUX, ldconfig_text=text)
    assert not facts.usable and "missing" in facts.reason


def test_old_glibc_needs_libpthread_linkage(tmp_path: Path) -> None:
    unlinked = _elf(tmp_path / "libtcmalloc_minimal.so.4", ["libc.so.6"])
    linked = _elf(tmp_path / "libtcmalloc.so.4", ["libpthread.so.0", "libc.so.6"])
    text = _ldconfig(("libtcmalloc_minimal.so.4", "libc6,x86-64", unlinked), ("libtcmalloc.so.4", "libc6,x86-64", linked))
    old = SystemFacts(os="linux", arch="x86_64", glibc="2.31")
    facts = tcmalloc.probe_tcmalloc(old, ldconfig_text=text)
    assert facts.usable and facts.library == str(linked)  # the unlinked _minimal was skipped
    new = tcmalloc.probe_tcmalloc(LINUX, ldconfig_text=text)
    assert new.library == str(unlinked)  # glibc ≥ 2.34 has pthread inside libc


def test_old_glibc_nothing_linked(tmp_path: Path) -> None:
    unlinked = _elf(tmp_path / "libtcmalloc_minimal.so.4", ["libc.so.6"])
    text = _ldconfig(("libtcmalloc_minimal.so.4", "libc6,x86-64", unlinked))
    facts = tcmalloc.probe_tcmalloc(SystemFacts(os="linux", arch="x86_64", glibc="2.27"), ldconfig_text=text)
    assert not facts.usable and "libpthread" in facts.reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and ldd are Linux things")
def test_elf_reader_agrees_with_ldd_on_a_real_library() -> None:
    import _ctypes

    lib = Path(_ctypes.__file__)
    needed = tcmalloc.elf_needed(lib)
    assert needed, "the real _ctypes extension has DT_NEEDED entries (libffi, libc)"
    ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=10).stdout
    for name in needed:
        assert name in ldd
    assert tcmalloc.elf_needed(Path(sys.executable).with_name("no-such-file")) is None


def test_elf_reader_refuses_non_elf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an elf at all" * 10)
    assert tcmalloc.elf_needed(junk) is None


def test_missing_names_the_distribution_package(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n")
    facts = tcmalloc.probe_tcmalloc(LINUX, ldconfig_text=_ldconfig(), root=tmp_path)
    assert not facts.usable and facts.package == "libtcmalloc-minimal4"
    (tmp_path / "etc" / "os-release").write_text("ID=fedora\n")
    assert tcmalloc.probe_tcmalloc(LINUX, ldconfig_text="", root=tmp_path).package == "gperftools-libs"
    (tmp_path / "etc" / "os-release").write_text("ID=arch\n")
    assert tcmalloc.probe_tcmalloc(LINUX, ldconfig_text="", root=tmp_path).package == "gperftools"


@pytest.mark.parametrize("os_name", ["windows", "darwin"])
def test_not_applicable_off_linux(os_name: str) -> None:
    facts = tcmalloc.probe_tcmalloc(SystemFacts(os=os_name))
    assert not facts.usable and os_name in facts.reason


def test_ldconfig_runs_with_sbin_on_path_and_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(cmd, **kw):  # type: ignore[no-untyped-def]
        seen["cmd"], seen["env"], seen["timeout"] = cmd, kw["env"], kw["timeout"]
        return subprocess.CompletedProcess(cmd, 0, "0 libs found\n", "")

    monkeypatch.setattr(tcmalloc.subprocess, "run", fake_run)
    assert tcmalloc.run_ldconfig() == "0 libs found\n"
    assert seen["cmd"] == ["ldconfig", "-p"]
    assert str(seen["env"]["PATH"]).startswith("/sbin:/usr/sbin:")  # type: ignore[index]
    assert seen["timeout"] is not None


def test_ldconfig_missing_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kw):  # type: ignore[no-untyped-def]
        raise FileNotFoundError("ldconfig")

    monkeypatch.setattr(tcmalloc.subprocess, "run", fake_run)
    facts = tcmalloc.probe_tcmalloc(LINUX)
    assert not facts.usable and "ldconfig" in facts.reason
