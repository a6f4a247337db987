"""Test isolation: every test gets its own LOWVRAM_HOME and a clean lowvram environment."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_LOWVRAM_VARS = ("LOWVRAM_HOME", "LOWVRAM_WEBUI", "LOWVRAM_FACTS", "LOWVRAM_MIRROR", "LOWVRAM_DEBUG",
                 "LOWVRAM_HOOK", "LOWVRAM_CONFIG", "LOWVRAM_KILL_AT", "LOWVRAM_KILL_TRACE",
                 "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "COMMANDLINE_ARGS", "NO_COLOR", "FORCE_COLOR")


def pytest_configure(config: pytest.Config) -> None:
    # Fixtures make git repositories; give git an identity that never comes from the machine.
    os.environ.setdefault("GIT_AUTHOR_NAME", "lowvram tests")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@lowvram.invalid")
    os.environ.setdefault("GIT_COMMITTER_NAME", "lowvram tests")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@lowvram.invalid")
    # The suite needs no network: git may only use local repositories (file:// and paths).
    os.environ["GIT_ALLOW_PROTOCOL"] = "file"


@pytest.fixture(autouse=True)
def lowvram_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in _LOWVRAM_VARS:
        monkeypatch.delenv(var, raising=False)
    # Screens wrap to COLUMNS (80 when piped, docs/architecture.md#the-cli-contract). Tests that check what a
    # screen says read it unwrapped; tests/unit/test_screens.py checks the layout at 60, 80 and 120 columns.
    monkeypatch.setenv("COLUMNS", "1000")
    home = tmp_path_factory.mktemp("lowvram-home")
    monkeypatch.setenv("LOWVRAM_HOME", str(home))
    return home


@pytest.fixture
def rtx3060_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (no WebUI in or above it) on a machine whose NVML is a fake RTX 3060."""
    from lowvram.world.detect import nvml
    from tests.fixtures import fake_nvml

    monkeypatch.setattr(nvml, "pynvml", fake_nvml.SCENARIOS["rtx3060"]())
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run the CLI in-process: `cli("doctor", "--json")` -> CliResult."""
    from lowvram.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_lowvram(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m lowvram` in a real subprocess (for kill, signal and start-up tests)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout, input=input)
