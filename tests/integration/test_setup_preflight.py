"""Setup's checks of the machine that are warnings, not refusals: the system Python the UI will use."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowvram.world import setup_ui


def _fake_python(bin_dir: Path, name: str, version: str | None) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    body = f"echo {version}" if version else "echo 'pyenv: python3.10: command not found' >&2; exit 127"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def test_a_python_too_new_for_a1111_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_python(tmp_path / "bin", "python3", "3.12")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (warning,) = setup_ui.host_python_warnings(setup_ui.ui_spec("a1111"))
    assert "is Python 3.12" in warning
    assert "3.10 or 3.11" in warning
    assert "torch 2.1.2" in warning
    # The same Python suits SD.Next.
    assert setup_ui.host_python_warnings(setup_ui.ui_spec("sdnext")) == []


def test_a_broken_python310_shim_falls_back_to_python3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_python(tmp_path / "bin", "python3.10", None)  # a pyenv shim for a version not installed
    _fake_python(tmp_path / "bin", "python3", "3.10")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert setup_ui.host_python_warnings(setup_ui.ui_spec("a1111")) == []


def test_no_python_at_all_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (warning,) = setup_ui.host_python_warnings(setup_ui.ui_spec("comfyui"))
    assert "no working python3 on PATH" in warning


def test_preflight_refusals_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = setup_ui.ui_spec("a1111")
    registry = setup_ui.load_registry()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(setup_ui.SetupError) as info:
        setup_ui.preflight(spec, setup_ui.TargetInfo(tmp_path / "w", "absent"), registry)
    assert "git is not installed" in info.value.message
    assert "git" in info.value.hint
