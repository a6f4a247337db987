"""System probing: OS facts, WSL, other GPUs, with /proc and /sys pointed at a tmp tree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lowvram.core.facts import OtherGpu
from lowvram.world.detect import system


def _card(root: Path, name: str, vendor: str, device: str = "0x73ff", product: str | None = None) -> None:
    dev = root / "sys" / "class" / "drm" / name / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "device").write_text(device + "\n")
    if product:
        (dev / "product_name").write_text(product + "\n")


def test_probe_system_here_is_sane(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text('NAME="Testix"\nPRETTY_NAME="Testix 9 (tiny)"\nID=debian\n')
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "version").write_text("Linux version 6.1.0 (gcc)\n")
    facts = system.probe_system(driver=None, root=tmp_path, os_name="linux")
    assert facts.os == "linux"
    assert facts.os_version is not None and facts.os_version.startswith("Testix 9 (tiny)")
    assert facts.ram_mb is not None and facts.ram_mb > 100
    assert facts.swap_mb is not None and facts.swap_mb >= 0
    assert facts.wsl is False
    assert facts.sysmem_fallback == "unsupported"
    assert facts.glibc is not None and facts.glibc[0].isdigit()


def test_wsl_from_proc_version_means_fallback_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSL_DISTRO_NAME", raising=False)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "version").write_text("Linux version 5.15.153.1-microsoft-standard-WSL2\n")
    facts = system.probe_system(driver="552.22", root=tmp_path, os_name="linux")
    assert facts.wsl is True
    assert facts.sysmem_fallback == "on"


def test_wsl_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSL_DISTRO_NAME", "Ubuntu")
    assert system.detect_wsl(tmp_path) is True


@pytest.mark.parametrize(("driver", "expected"), [("531.79", "unsupported"), ("537.58", "on"), ("551.86", "unknown")])
def test_windows_fallback_follows_the_driver(tmp_path: Path, driver: str, expected: str) -> None:
    facts = system.probe_system(driver=driver, root=tmp_path, os_name="windows")
    assert facts.sysmem_fallback == expected
    assert facts.glibc is None and facts.wsl is False


def test_amd_and_intel_cards_are_noted_nvidia_and_connectors_skipped(tmp_path: Path) -> None:
    _card(tmp_path, "card0", "0x8086", "0x4680")
    _card(tmp_path, "card1", "0x1002", "0x73ff", product="Radeon RX 6600")
    _card(tmp_path, "card2", "0x10de", "0x1b81")
    (tmp_path / "sys" / "class" / "drm" / "card1-DP-1").mkdir()
    found = system.probe_other_gpus(root=tmp_path, os_name="linux")
    assert found == (OtherGpu("intel", "Intel GPU (PCI 8086:4680)"), OtherGpu("amd", "Radeon RX 6600"))


def test_no_drm_means_no_other_gpus(tmp_path: Path) -> None:
    assert system.probe_other_gpus(root=tmp_path, os_name="linux") == ()


def test_apple_silicon_is_noted_on_arm_macs() -> None:
    assert system.probe_other_gpus(os_name="darwin", arch="arm64")[0].vendor == "apple"
    assert system.probe_other_gpus(os_name="darwin", arch="x86_64") == ()


def test_windows_adapter_names_are_classified() -> None:
    names = ["NVIDIA GeForce RTX 3060", "Intel(R) UHD Graphics 770", "AMD Radeon(TM) Graphics", ""]
    assert system.classify_adapters(names) == (
        OtherGpu("intel", "Intel(R) UHD Graphics 770"),
        OtherGpu("amd", "AMD Radeon(TM) Graphics"),
    )


def test_windows_adapter_query_has_a_timeout_and_survives_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(cmd, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw)
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(system.subprocess, "run", fake_run)
    assert system.probe_other_gpus(os_name="windows") == ()
    assert isinstance(seen["timeout"], float) and seen["timeout"] <= 1.0


def test_windows_adapter_query_parses_wmic_output(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kw):  # type: ignore[no-untyped-def]
        return subprocess.CompletedProcess(cmd, 0, "Name  \r\nNVIDIA GeForce GTX 1070  \r\nIntel(R) HD Graphics 630  \r\n\r\n", "")

    monkeypatch.setattr(system.subprocess, "run", fake_run)
    assert system.probe_other_gpus(os_name="windows") == (OtherGpu("intel", "Intel(R) HD Graphics 630"),)


def test_os_release_parsing(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "os-release").write_text('# comment\nID="fedora"\nID_LIKE=""\nVERSION_ID=40\n')
    assert system.os_release(tmp_path)["ID"] == "fedora"
    assert system.os_release(tmp_path / "nowhere") == {}


def test_meminfo_is_read_in_mib(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(
        "MemTotal:       32768000 kB\nMemFree:         1000 kB\nSwapTotal:       2097152 kB\nHugePages_Total:       0\n")
    assert system.meminfo(tmp_path) == (32000, 2048)
    assert system.meminfo(tmp_path / "nowhere") == (None, None)


def test_meminfo_agrees_with_psutil_here() -> None:
    import sys

    import psutil

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/meminfo is Linux")
    ram, swap = system.meminfo()
    assert ram == psutil.virtual_memory().total // (1024 * 1024)
    assert swap == psutil.swap_memory().total // (1024 * 1024)
