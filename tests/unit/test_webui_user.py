"""The managed-block writer on real-world webui-user files: exact bytes for apply, re-apply, revert."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowvram.core import markers
from lowvram.core.errors import ApplyError
from lowvram.world.apply import webui_user as wu
from tests.fixtures.git_repos import simple_plan
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT, STOCK_WEBUI_USER_SH

TCM = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
CFG = "/home/u/.local/state/lowvram/webuis/abc/hook.json"
CFG_WIN = "C:\\Users\\u\\AppData\\Local\\lowvram\\webuis\\abc\\hook.json"  # what Windows' lowvram writes

SH_BLOCK = (
    f"{markers.BLOCK_BEGIN}\n"
    'export COMMANDLINE_ARGS="${COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }--xformers --medvram-sdxl"\n'
    f'export LD_PRELOAD="{TCM}"\n'
    f'export LOWVRAM_CONFIG="{CFG}"\n'
    f"{markers.BLOCK_END}\n"
).encode()

BAT_BLOCK_LINES = [
    markers.BAT_BLOCK_BEGIN,
    # The user's value is read through `for /f` (never re-parsed by cmd); see test_bat_wine.py.
    'if defined COMMANDLINE_ARGS for /f "tokens=1,* delims==" %%J in (\'set COMMANDLINE_ARGS\') do '
    'if /i "%%J"=="COMMANDLINE_ARGS" set "COMMANDLINE_ARGS=%%K --xformers --medvram-sdxl"',
    'if not defined COMMANDLINE_ARGS set "COMMANDLINE_ARGS=--xformers --medvram-sdxl"',
    'set "PYTORCH_CUDA_ALLOC_CONF=garbage_collection_threshold:0.6"',
    f'set "LOWVRAM_CONFIG={CFG_WIN}"',
    markers.BAT_BLOCK_END,
]


def _plan_sh():  # type: ignore[no-untyped-def]
    return simple_plan(env={"LD_PRELOAD": TCM})


def _plan_bat():  # type: ignore[no-untyped-def]
    return simple_plan(env={"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6"})


def _apply(path: Path, kind: str, plan, before_call: bool = False) -> wu.FileChange:  # type: ignore[no-untyped-def]
    change = wu.plan_change(wu.Target(path, kind, before_call), wu.block_vars(plan, CFG if kind == wu.SH else CFG_WIN))
    path.write_bytes(change.new)
    return change


USER_EXPORT_SH = STOCK_WEBUI_USER_SH.replace('#export COMMANDLINE_ARGS=""', 'export COMMANDLINE_ARGS="--api --listen"')

# (id, original bytes, expected bytes after apply)
SH_CASES = [
    ("stock", STOCK_WEBUI_USER_SH.encode(), STOCK_WEBUI_USER_SH.encode() + SH_BLOCK),
    ("user-export", USER_EXPORT_SH.encode(), USER_EXPORT_SH.encode() + SH_BLOCK),
    ("no-final-newline", b"#!/bin/bash\nexport COMMANDLINE_ARGS='--api'",
     b"#!/bin/bash\nexport COMMANDLINE_ARGS='--api'\n" + SH_BLOCK),
    ("crlf", b"#!/bin/bash\r\nexport COMMANDLINE_ARGS=\"--api\"\r\n",
     b"#!/bin/bash\r\nexport COMMANDLINE_ARGS=\"--api\"\r\n" + SH_BLOCK),
    ("odd-bytes", "# caf\u00e9 \u2603 \U0001f600\n".encode() + b"# latin-1 \xe9\xff\n",
     "# caf\u00e9 \u2603 \U0001f600\n".encode() + b"# latin-1 \xe9\xff\n" + SH_BLOCK),
    ("empty", b"", SH_BLOCK),
]


@pytest.mark.parametrize(("original", "expected"), [c[1:] for c in SH_CASES], ids=[c[0] for c in SH_CASES])
def test_sh_apply_reapply_revert_exact_bytes(tmp_path: Path, original: bytes, expected: bytes) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_bytes(original)
    first = _apply(path, wu.SH, _plan_sh())
    assert path.read_bytes() == expected
    again = _apply(path, wu.SH, _plan_sh())
    assert again.action == "unchanged"
    assert path.read_bytes() == expected
    assert wu.remove_block(path.read_bytes(), wu.SH, added_newline=first.added_newline) == original


def test_sh_reapply_with_another_plan_replaces_in_place_and_keeps_lines_after(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_bytes(STOCK_WEBUI_USER_SH.encode())
    _apply(path, wu.SH, _plan_sh())
    path.write_bytes(path.read_bytes() + b"export MY_VAR=1\n")  # the user adds a line after the block
    _apply(path, wu.SH, simple_plan(args=("--lowvram",), env={"NO_TCMALLOC": "True"}))
    data = path.read_bytes()
    assert data.count(markers.BLOCK_BEGIN.encode()) == 1
    assert b'--lowvram"\nexport NO_TCMALLOC="True"\n' in data
    assert b"--medvram-sdxl" not in data
    assert data.endswith(markers.BLOCK_END.encode() + b"\nexport MY_VAR=1\n")
    assert wu.remove_block(data, wu.SH) == STOCK_WEBUI_USER_SH.encode() + b"export MY_VAR=1\n"


def test_missing_file_is_created_with_only_the_block(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    change = _apply(path, wu.SH, _plan_sh())
    assert change.action == "created"
    assert path.read_bytes() == SH_BLOCK


def test_block_bytes_depend_only_on_the_plan() -> None:
    a = wu.render_block(wu.block_vars(_plan_sh(), CFG), wu.SH)
    b = wu.render_block(wu.block_vars(_plan_sh(), CFG), wu.SH)
    assert a == b == SH_BLOCK.decode()


def test_a_plan_that_overrides_user_flags_still_appends_to_the_live_line() -> None:
    # Never a frozen copy of the user's flags in the block (issue 14 class 6): their line stays live.
    plan = simple_plan(args=("--medvram-sdxl", "--device-id", "0"), env={}, merge="assign",
                       user_args_kept=("--api", "--port", "7861"))
    text = wu.render_block(wu.block_vars(plan), wu.SH)
    assert 'export COMMANDLINE_ARGS="${COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }--medvram-sdxl --device-id 0"\n' in text
    assert "7861" not in text
    bat = wu.render_block(wu.block_vars(plan), wu.BAT)
    assert 'set "COMMANDLINE_ARGS=%%K --medvram-sdxl --device-id 0"\r\n' in bat
    assert "7861" not in bat


def test_no_args_in_append_mode_writes_no_commandline_line() -> None:
    text = wu.render_block(wu.block_vars(simple_plan(args=(), env={"NO_TCMALLOC": "True"})), wu.SH)
    assert "COMMANDLINE_ARGS" not in text
    assert 'export NO_TCMALLOC="True"' in text


# --------------------------------------------------------------------------------------------- .bat

BAT_CRLF_BLOCK = "".join(line + "\r\n" for line in BAT_BLOCK_LINES).encode()
FORGE_BAT = ("@echo off\r\n\r\nset PYTHON=\r\nset GIT=\r\nset VENV_DIR=\r\nset COMMANDLINE_ARGS=--xformers\r\n\r\n"
             "@REM Uncomment following code to reference an existing A1111 checkout.\r\n"
             "@REM set A1111_HOME=Your A1111 checkout dir\r\n\r\ncall webui.bat\r\n")
BAT_CASES = [
    ("stock", STOCK_WEBUI_USER_BAT.encode(),
     STOCK_WEBUI_USER_BAT.encode().replace(b"call webui.bat", BAT_CRLF_BLOCK + b"call webui.bat")),
    ("forge", FORGE_BAT.encode(), FORGE_BAT.encode().replace(b"call webui.bat", BAT_CRLF_BLOCK + b"call webui.bat")),
    ("lf-only", b"@echo off\nset COMMANDLINE_ARGS=\nCALL \"%~dp0webui.bat\" %*\n",
     b"@echo off\nset COMMANDLINE_ARGS=\n" + BAT_CRLF_BLOCK.replace(b"\r\n", b"\n") + b"CALL \"%~dp0webui.bat\" %*\n"),
    ("no-final-newline", b"@echo off\r\ncall webui.bat",
     b"@echo off\r\n" + BAT_CRLF_BLOCK + b"call webui.bat"),
]


@pytest.mark.parametrize(("original", "expected"), [c[1:] for c in BAT_CASES], ids=[c[0] for c in BAT_CASES])
def test_bat_block_goes_right_before_call_webui_bat(tmp_path: Path, original: bytes, expected: bytes) -> None:
    path = tmp_path / "webui-user.bat"
    path.write_bytes(original)
    target = wu.choose_target(tmp_path, "windows")
    assert target.path == path
    _apply(path, wu.BAT, _plan_bat(), before_call=True)
    assert path.read_bytes() == expected
    assert _apply(path, wu.BAT, _plan_bat(), before_call=True).action == "unchanged"
    assert wu.remove_block(path.read_bytes(), wu.BAT) == original


def test_bat_without_call_line_goes_into_webui_settings_bat(tmp_path: Path) -> None:
    (tmp_path / "webui-user.bat").write_bytes(b"@echo off\r\nset COMMANDLINE_ARGS=--api\r\n")
    target = wu.choose_target(tmp_path, "windows")
    assert target.path == tmp_path / "webui.settings.bat"
    assert not target.before_call
    change = _apply(target.path, target.kind, _plan_bat())
    assert change.action == "created"
    assert target.path.read_bytes() == BAT_CRLF_BLOCK
    assert (tmp_path / "webui-user.bat").read_bytes() == b"@echo off\r\nset COMMANDLINE_ARGS=--api\r\n"


def test_windows_without_any_webui_user_bat_uses_webui_settings_bat(tmp_path: Path) -> None:
    assert wu.choose_target(tmp_path, "windows").path == tmp_path / "webui.settings.bat"
    assert wu.choose_target(tmp_path, "linux").path == tmp_path / "webui-user.sh"
    assert wu.choose_target(tmp_path, "darwin").path == tmp_path / "webui-user.sh"


def test_bat_doubles_percent_and_refuses_double_quotes() -> None:
    plan = simple_plan(args=("--ckpt-dir", r"C:\100% models\\"), env={"LOWVRAM_CONFIG": r"C:\a%b\hook.json"})
    text = wu.render_block(wu.block_vars(plan), wu.BAT)
    assert r'''set "COMMANDLINE_ARGS=%%K --ckpt-dir 'C:\100%% models\\'"''' in text
    assert r'set "LOWVRAM_CONFIG=C:\a%%b\hook.json"' in text
    with pytest.raises(ApplyError, match="double quote"):
        wu.render_block(wu.block_vars(simple_plan(args=('--x="y"',), env={})), wu.BAT)


def test_bat_non_ascii_refused_with_a_hint_unless_the_file_switches_to_utf8() -> None:
    text = wu.render_block(wu.block_vars(simple_plan(args=(), env={"LOWVRAM_CONFIG": "C:\\Users\\J\u00fcrgen\\h.json"})),
                           wu.BAT)
    with pytest.raises(ApplyError) as info:
        wu.encode_block(text, wu.BAT, b"@echo off\r\n")
    assert "code page" in info.value.message
    assert "ASCII" in info.value.hint
    data = wu.encode_block(text, wu.BAT, b"@echo off\r\nchcp 65001 > nul\r\n")
    assert "J\u00fcrgen".encode() in data


def test_line_breaks_in_values_are_refused() -> None:
    with pytest.raises(ApplyError, match="line break"):
        wu.block_vars(simple_plan(args=("--x\nrm -rf /",), env={}))


def test_begin_marker_without_end_is_an_error_not_a_guess(tmp_path: Path) -> None:
    data = STOCK_WEBUI_USER_SH.encode() + markers.BLOCK_BEGIN.encode() + b'\nexport X="1"\n'
    with pytest.raises(ApplyError, match="end marker is missing"):
        wu.insert_block(data, SH_BLOCK, wu.SH)


def test_diff_shows_the_block_lines() -> None:
    diff = wu.unified_diff("webui-user.sh", STOCK_WEBUI_USER_SH.encode(), STOCK_WEBUI_USER_SH.encode() + SH_BLOCK)
    assert diff.startswith("--- a/webui-user.sh\n+++ b/webui-user.sh\n")
    assert f"+{markers.BLOCK_BEGIN}\n" in diff
    assert wu.unified_diff("webui-user.sh", None, SH_BLOCK).startswith("--- /dev/null\n")


# --------------------------------------------------------------------------------------------- quoting

@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=12),
                max_size=6))
def test_shlex_quoting_round_trips_for_a1111(tokens: list[str]) -> None:
    assert shlex.split(wu.shlex_args(tokens)) == tokens


def test_windows_paths_are_single_quoted_for_shlex() -> None:
    value = wu.shlex_args(["--ckpt-dir", "C:\\models\\", "--data-dir", "\\\\server\\share", "it's"])
    assert value == "--ckpt-dir 'C:\\models\\' --data-dir '\\\\server\\share' 'it'\"'\"'s'"
    assert shlex.split(value) == ["--ckpt-dir", "C:\\models\\", "--data-dir", "\\\\server\\share", "it's"]


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"'),
                        max_size=12), max_size=6))
def test_cmd_flavoured_quoting_round_trips_without_double_quotes(tokens: list[str]) -> None:
    value = wu.shlex_args(tokens, for_cmd=True)
    assert '"' not in value
    assert shlex.split(value) == tokens
