"""The CLI's global behaviour: version, help, exit codes, one-line errors."""

from __future__ import annotations

from lowvram import __version__
from tests.conftest import run_lowvram


def test_version_prints_the_package_version(cli) -> None:
    result = cli("--version")
    assert result.code == 0
    assert result.out.strip() == f"lowvram {__version__}"


def test_python_dash_m_runs_the_same_cli() -> None:
    proc = run_lowvram("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"lowvram {__version__}"


def test_unknown_command_is_a_usage_error_with_exit_2(cli) -> None:
    result = cli("no-such-command")
    assert result.code == 2
    assert "Traceback" not in result.err
