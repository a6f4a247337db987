"""Screens that fit (issue 16 items 4-6): every screen fits COLUMNS (80 when piped) and splits no word,
`--help` keeps its examples' lines and its command summaries whole, `--debug` works after the subcommand,
and `apply --dry-run` says what it would do, not what it did.

Words are compared with the same screen rendered 1000 columns wide: a word split across two lines (or
cut with "...") shows up as words the wide screen does not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.cli.app import COMMAND_ORDER
from lowvram.core.observations import Observation
from lowvram.world import paths
from lowvram.world.observation_log import append_observation
from tests.conftest import REPO
from tests.fixtures.facts_matrix import MACHINES, TCMALLOC_NONE, write_facts
from tests.fixtures.git_repos import tree_snapshot
from tests.fixtures.webui_trees import make_webui

ANSI = re.compile(r"\x1b\[[0-9;]*m")
COMMANDS = [[c] for c in COMMAND_ORDER] + [["profiles", "list"], ["profiles", "show"]]


@pytest.fixture
def where(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A WebUI tree, lowvram's home and facts files under a short path, as long as a user's (a path is one
    word: longer than the screen it stays whole), with a manual reading and a tuning run, so that reserve
    has every table to show."""
    base = Path(tempfile.mkdtemp(prefix="lv"))
    monkeypatch.setenv("LOWVRAM_HOME", str(base / "home"))
    try:
        tree = make_webui(base / "sd")
        # (no TCMalloc: its library's path is longer than a reason column at 80 can be, see below)
        linux = write_facts(replace(MACHINES["gtx1070-8gb"], tcmalloc=TCMALLOC_NONE), base / "linux.json")
        win = write_facts(MACHINES["rtx4060-8gb-win"], base / "win.json")
        from lowvram.world.detect.webui import probe_webui

        key = probe_webui(tree).checkpoint_key
        log = paths.observations_path(tree)
        append_observation(log, Observation(time=1.7e9, source="manual", checkpoint=None, free_mb=600,
                                            overflow_mb=1000, overflow_source="manual"))
        for t, reserve, sit in [(1, 0, 3.0), (2, 1600, 2.2), (3, 1088, 1.8), (4, 832, 2.1), (5, 1344, 2.0)]:
            append_observation(log, Observation(time=1.7e9 + t, source="tuning", checkpoint=key, road="resident",
                                                layout=True, reserve_mb=reserve, free_mb=600, overflow_mb=1000,
                                                sit=sit, width=1024, height=1024, driver="551.86"))
        monkeypatch.chdir(base)
        yield {"tree": str(tree), "linux": str(linux), "win": str(win)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


SCREENS: dict[str, tuple[list[str], list[str]]] = {
    # name: (arguments, what the screen must still show at 60 columns)
    "plan": (["plan", "--webui", "{tree}", "--facts", "{win}"], ["setting", "offload", "flags lowvram adds:"]),
    "plan-no-webui": (["plan", "--facts", "{linux}", "--model", "sdxl"], ["setting", "reserve", "headroom_mb"]),
    "doctor": (["doctor", "--webui", "{tree}", "--facts", "{linux}"], ["gpu.nvidia", "webui.found", "failed"]),
    "doctor-windows": (["doctor", "--facts", "{win}"], ["gpu.sysmem_fallback", "skipped"]),
    "estimate": (["estimate", "--webui", "{tree}", "--facts", "{win}", "--hires-scale", "1.5"],
                 ["peak", "weights_unet", "largest square"]),
    "estimate-sweep": (["estimate", "--model", "sdxl", "--vram-mb", "8192", "--sweep"], ["1024²", "medvram-sdxl"]),
    "estimate-formats": (["estimate", "--model", "flux1-dev", "--facts", "{win}", "--formats"],
                         ["q4_k_s", "streamed/step", "relative", "recommended:"]),
    "reserve": (["reserve", "--webui", "{tree}", "--facts", "{win}"], ["formula", "tuning", "reserve MiB"]),
    "profiles-list": (["profiles", "list"], ["gtx1070-sdxl", "description"]),
    "profiles-show": (["profiles", "show", "gtx1070-sdxl"], ["layout.mode", "inherited"]),
}


def _screen(cli: Any, monkeypatch: pytest.MonkeyPatch, columns: int, args: list[str]) -> Any:
    monkeypatch.setenv("COLUMNS", str(columns))
    result = cli(*args)
    assert "Traceback" not in result.err and "unexpected error" not in result.err, result.err
    return result


def _too_long(text: str, width: int) -> list[str]:
    return [line for line in ANSI.sub("", text).splitlines() if len(line) > width]


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("name", sorted(SCREENS))
def test_every_screen_fits_the_width_and_splits_no_word(cli, monkeypatch, where, name: str, columns: int) -> None:
    args = [a.format(**where) for a in SCREENS[name][0]]
    wide = _screen(cli, monkeypatch, 1000, args)
    narrow = _screen(cli, monkeypatch, columns, args)
    assert narrow.code == wide.code, narrow.err
    assert not _too_long(narrow.out, columns), "\n".join(_too_long(narrow.out, columns))
    split = Counter(narrow.out.split()) - Counter(wide.out.split())
    assert not split, f"words cut at {columns} columns: {sorted(split)}\n{narrow.out}"


@pytest.mark.parametrize("name", sorted(SCREENS))
def test_every_screen_still_renders_at_60_columns(cli, monkeypatch, where, name: str) -> None:
    args, shown = SCREENS[name]
    args = [a.format(**where) for a in args]
    wide = _screen(cli, monkeypatch, 1000, args)
    narrow = _screen(cli, monkeypatch, 60, args)
    assert narrow.code == wide.code, narrow.err
    for text in shown:
        assert text in narrow.out, f"{text!r} missing at 60 columns:\n{narrow.out}"


def test_long_reasons_wrap_inside_their_column(cli, monkeypatch, where) -> None:
    """plan's `why` column: a reason's continuation lines start where the column starts."""
    out = _screen(cli, monkeypatch, 80, ["plan", "--webui", where["tree"], "--facts", where["win"]]).out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:4] == ["setting", "value", "source", "why"])
    column = header.index("why")
    rows = lines[lines.index(header) + 1:]
    continued = [line for line in rows[: rows.index("")] if line[:column].strip() == "" and line.strip()]
    assert continued, out  # some reason is longer than the column at 80
    assert all(len(line) - len(line.lstrip()) == column for line in continued), out


def test_a_word_longer_than_its_column_can_be_folds_inside_it(cli, monkeypatch, where, tmp_path: Path) -> None:
    """The one exception to whole words: a library path in a reason, longer than the reason column can be
    at 80 columns beside the setting names. It folds inside the column; every line still fits."""
    facts = write_facts(MACHINES["gtx1070-8gb"], tmp_path / "f.json")
    library = str(MACHINES["gtx1070-8gb"].tcmalloc.library)
    out = _screen(cli, monkeypatch, 80, ["plan", "--facts", str(facts), "--model", "sdxl"]).out
    assert not _too_long(out, 80)
    lines = out.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("tcmalloc "))
    column = lines[start].index("preloading")
    pieces = [line[column:].split(" ")[0] for line in lines[start + 1: start + 3]]
    assert "".join(pieces).startswith(library), out
    assert len(pieces[0]) < len(library)  # folded inside the column, not left to run past the edge


def test_piped_output_without_columns_is_80_wide(where) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "lowvram", "doctor", "--facts", where["win"]], capture_output=True,
                          text=True, env=env, cwd=where["tree"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    assert max(len(line) for line in proc.stdout.splitlines()) > 60  # it does use the 80 columns


@pytest.mark.parametrize("args", [["plan", "--webui", "{tree}", "--facts", "{win}", "--json"],
                                  ["doctor", "--webui", "{tree}", "--facts", "{linux}", "--json"],
                                  ["estimate", "--model", "sdxl", "--vram-mb", "8192", "--sweep", "--json"],
                                  ["estimate", "--model", "flux1-dev", "--vram-mb", "8192", "--formats", "--json"]],
                         ids=lambda a: a[0])
def test_json_is_never_wrapped(cli, monkeypatch, where, args: list[str]) -> None:
    args = [a.format(**where) for a in args]
    narrow = _screen(cli, monkeypatch, 40, args).out
    assert narrow == _screen(cli, monkeypatch, 1000, args).out
    json.loads(narrow)


# --------------------------------------------------------------------------- --help


def _wide_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`--help` as click lays it out 1000 columns wide, the same app in-process."""
    import typer

    from lowvram.cli.app import app

    capsys.readouterr()
    typer.main.get_command(app).main(args=[*command, "--help"], prog_name="lowvram", standalone_mode=False,
                                     terminal_width=1000, max_content_width=1000)
    return capsys.readouterr().out


def _help_source(command: list[str]) -> str:
    import typer

    from lowvram.cli.app import app

    node: Any = typer.main.get_command(app)
    for name in command:
        node = node.commands[name]
    return str(node.help or "")


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "lowvram")
def test_help_fits_and_splits_no_word(cli, capsys, monkeypatch, command: list[str], columns: int) -> None:
    result = _screen(cli, monkeypatch, columns, [*command, "--help"])
    assert result.code == 0, result.err
    assert not _too_long(result.out, columns), "\n".join(_too_long(result.out, columns))
    split = Counter(result.out.split()) - Counter(_wide_help(command, capsys).split())
    assert not split, f"words cut at {columns} columns: {sorted(split)}\n{result.out}"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_examples_keep_their_lines(cli, monkeypatch, command: list[str]) -> None:
    """Each example command is a line of its own, whole (click rewraps paragraphs unless told not to)."""

    def bare(line: str) -> str:
        return re.sub(r"^Examples?:\s*", "", line.strip())

    examples = [bare(line) for line in _help_source(command).splitlines() if bare(line).startswith("lowvram ")]
    assert examples or command == ["profiles"]
    out_lines = [bare(line) for line in _screen(cli, monkeypatch, 80, [*command, "--help"]).out.splitlines()]
    for example in examples:
        assert example in out_lines, f"example {example!r} was rewrapped:\n" + "\n".join(out_lines)


@pytest.mark.parametrize("group", [[], ["profiles"]], ids=lambda g: " ".join(g) or "lowvram")
def test_help_command_summaries_are_whole_sentences(cli, monkeypatch, group: list[str]) -> None:
    out = _screen(cli, monkeypatch, 80, [*group, "--help"]).out
    listing = " ".join(out.split("Commands:", 1)[1].split())
    assert "..." not in listing
    names = COMMAND_ORDER if not group else ("list", "show")
    for name in names:
        first = " ".join(_help_source([*group, name]).split("\n\n")[0].replace("\b", "").split())
        sentence = first.split(". ")[0].rstrip(".") + "."
        assert f"{name} {sentence}" in listing, f"{name}: {sentence!r} not whole in:\n{out}"


# --------------------------------------------------------------------------- stderr on a terminal


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is a POSIX thing")
def test_errors_wrap_on_a_terminal_and_stay_one_line_when_piped() -> None:
    import fcntl
    import pty
    import struct
    import termios

    missing = Path(tempfile.gettempdir()) / "lowvram-none" / "stable-diffusion-webui"  # a path as long as a user's
    argv = [sys.executable, "-m", "lowvram", "plan", "--webui", str(missing)]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 1
    assert [line.split(":")[0] for line in piped.stderr.splitlines()] == ["error", "hint"]
    assert len(piped.stderr.splitlines()[1]) > 80  # a long hint: the case that wraps on a terminal

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child closed its end
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 1
    shown = ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    assert shown.split() == piped.stderr.split()  # the same words, none cut


# --------------------------------------------------------------------------- --debug


FAILING = {
    # command: arguments that fail with a LowvramError (exit 1 or 2); {bad} is a folder that is no WebUI
    "plan": ["plan", "--webui", "{bad}"],
    "doctor": ["doctor", "--facts", "{bad}/facts.json"],
    "estimate": ["estimate", "--model", "sdxl", "--facts", "{bad}/facts.json"],
    "reserve": ["reserve", "--webui", "{bad}"],
    "apply": ["apply", "--webui", "{bad}"],
    "launch": ["launch", "--dry-run", "--webui", "{bad}"],
    "revert": ["revert", "--webui", "{bad}/gone"],
    "install-extensions": ["install-extensions", "--webui", "{bad}"],
    "tune": ["tune", "--webui", "{bad}"],
    "setup": ["setup", "--source", "no-equals-sign"],
    "profiles show": ["profiles", "show", "no-such-profile"],
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_debug_after_the_subcommand_shows_the_traceback(cli, tmp_path: Path, name: str) -> None:
    args = [a.format(bad=tmp_path) for a in FAILING[name]]
    plain = cli(*args)
    assert plain.code in (1, 2), plain.err
    assert "Traceback" not in plain.err
    lines = [line for line in plain.err.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), plain.err
    debug = cli(*args, "--debug")
    assert debug.code == plain.code, debug.err
    assert "Traceback" in debug.err, debug.err
    assert "No such option" not in debug.err
    again = cli(*args)  # --debug is for that run only
    assert "Traceback" not in again.err


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_accepts_and_documents_debug(cli, command: list[str]) -> None:
    result = cli(*command, "--debug", "--help")
    assert result.code == 0, result.err
    assert "--debug" in result.out and "LOWVRAM_DEBUG=1" in result.out


def test_debug_before_the_subcommand_and_lowvram_debug_still_work(cli, tmp_path: Path, monkeypatch) -> None:
    assert "Traceback" in cli("--debug", "plan", "--webui", str(tmp_path)).err
    monkeypatch.setenv("LOWVRAM_DEBUG", "1")
    assert "Traceback" in cli("plan", "--webui", str(tmp_path)).err


def test_debug_after_the_subcommand_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lowvram", "plan", "--webui", str(tmp_path), "--debug"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "No such option" not in proc.stderr


def test_debug_after_double_dash_belongs_to_the_ui(cli, tmp_path: Path) -> None:
    result = cli("launch", "--dry-run", "--webui", str(tmp_path), "--", "--debug")
    assert result.code == 1 and "Traceback" not in result.err


# --------------------------------------------------------------------------- apply --dry-run


def test_apply_dry_run_says_what_it_would_do(cli, tmp_path: Path) -> None:
    estimator = "a1111-stable-diffusion-webui-vram-estimator"
    tree = make_webui(tmp_path / "sd", config={"disabled_extensions": [estimator]})
    facts = write_facts(MACHINES["gtx1070-8gb"], tmp_path / "facts.json")
    before = tree_snapshot(tree)
    result = cli("apply", "--dry-run", "--webui", str(tree), "--facts", str(facts), "-p", "gtx1070-sdxl")
    assert result.code == 0, result.err
    out = result.out
    table = out.split("extensions (what apply would do):", 1)[1]
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0]
            in ("vram-estimator", "giant-kitten")}
    assert set(rows) == {"vram-estimator", "giant-kitten"}, out
    for name, row in rows.items():
        assert row.split()[1:3] == ["would", "install"], row
        assert re.search(rf"{name}: would clone \S+ at [0-9a-f]{{12}} \(dry run\)", " ".join(table.split()))
    assert not re.search(r"(?<!would )\binstalled\b", out), out
    assert "would be enabled again in config.json (dry run)" in " ".join(out.split())
    assert re.search(r"would modify\s+webui-user\.sh", out) and re.search(r"would create\s+extensions/lowvram-layout",
                                                                       out), out
    assert tree_snapshot(tree) == before
    data = json.loads(cli("apply", "--dry-run", "--webui", str(tree), "--facts", str(facts), "-p", "gtx1070-sdxl",
                          "--json").out)
    assert data["dry_run"] is True
    estimator_row = next(e for e in data["extensions"] if e["name"] == "vram-estimator")
    assert "would be enabled again" in estimator_row["reason"]
    assert tree_snapshot(tree) == before
