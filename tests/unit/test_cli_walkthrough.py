"""The newcomer's first minutes: help with examples everywhere, completion, NO_COLOR, one-line errors."""

from __future__ import annotations

import os

import pytest

from lowvram.cli.app import COMMAND_ORDER
from tests.conftest import run_lowvram

COMMANDS = [c for c in COMMAND_ORDER if c != "profiles"] + ["profiles list", "profiles show"]


def test_top_level_help_lists_every_command_in_order_and_offers_completion(cli) -> None:
    result = cli("--help")
    assert result.code == 0
    section = result.out.split("Commands:")[1].splitlines()
    listed = [line.split()[0] for line in section if line.strip() and not line.startswith("   ")]  # (not wrapped lines)
    assert listed == list(COMMAND_ORDER)
    assert "--install-completion" in result.out
    assert "--version" in result.out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(cli, command: str) -> None:
    result = cli(*command.split(), "--help")
    assert result.code == 0, result.err
    assert "Example" in result.out, f"`lowvram {command} --help` shows no example"
    assert f"lowvram {command.split(maxsplit=1)[0]}" in result.out.split("Example", 1)[1]


def test_no_color_keeps_escape_codes_out_even_when_forced(tmp_path) -> None:
    env = {"FORCE_COLOR": "1", "NO_COLOR": "1", "LOWVRAM_HOME": str(tmp_path)}
    proc = run_lowvram("profiles", "list", env=env)
    assert proc.returncode == 0
    assert "\x1b[" not in proc.stdout


def test_force_color_colours_without_a_terminal(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update({"FORCE_COLOR": "1", "LOWVRAM_HOME": str(tmp_path)})
    proc = run_lowvram("profiles", "list", env=env)
    assert "\x1b[" in proc.stdout


def test_show_completion_prints_a_completion_script() -> None:
    # typer finds "the current shell" by walking up the process tree (shellingham), and a suite started
    # with no shell above it (an IDE, a CI runner, setsid) has none: "Shell  not supported". typer's own
    # switch turns the option into `--show-completion SHELL`, so the shell is named, not detected.
    env = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    proc = run_lowvram("--show-completion", "bash", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "_LOWVRAM_COMPLETE=complete_bash" in proc.stdout
    assert "complete -o default -F _lowvram_completion lowvram" in proc.stdout


def test_a_failure_is_one_line_and_a_hint_and_debug_adds_the_traceback(cli, tmp_path) -> None:
    plain = cli("plan", "--webui", str(tmp_path))
    assert plain.code == 1
    assert "Traceback" not in plain.err
    lines = [x for x in plain.err.splitlines() if x.strip()]
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    debug = cli("--debug", "plan", "--webui", str(tmp_path))
    assert debug.code == 1
    assert "Traceback" in debug.err


def test_json_failure_prints_the_error_envelope(cli, tmp_path) -> None:
    import json

    result = cli("plan", "--webui", str(tmp_path), "--json")
    assert result.code == 1
    envelope = json.loads(result.out)
    assert envelope["schema"] == 1
    assert set(envelope["error"]) == {"message", "hint"}
