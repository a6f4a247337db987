"""Issue 14 class 5: marker lines that are not lowvram's block.

lowvram's marker text in places where the shell never runs it as lowvram's block (a here-document,
a `: '…'` no-op, a multi-line string, an if/function/case body, comments between the markers, a
`goto`-skipped part of a .bat, a parenthesised block). Before the fix, apply took the first begin
marker for its block: it wrote its exports there, where bash never runs them (the plan silently not
applied), and revert dropped the user's lines. Now only a block lowvram could have written, at the
top level, counts: the rest is the user's text, kept byte for byte, and apply adds its own block.
Real bash sources the result (as webui.sh does) and wine's real cmd runs the .bat.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.core import markers
from lowvram.core.errors import ApplyError
from lowvram.world.apply import apply_plan, revert
from lowvram.world.apply import webui_user as wu
from tests.fixtures.git_repos import linux_facts, simple_plan
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT, STOCK_WEBUI_USER_SH, make_webui
from tests.integration.test_block_hostile_cmd import wine_cmd

PLAN = simple_plan(args=("--medvram-sdxl", "--xformers"),
                   env={"NO_TCMALLOC": "True", "PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6"})
# A block as lowvram writes it, for another plan: what a user would copy around.
OLD_PLAN = simple_plan(args=("--lowvram",), env={"NO_TCMALLOC": "False"})
SH_COPY = wu.render_block(wu.block_vars(OLD_PLAN), wu.SH)
BAT_COPY = wu.render_block(wu.block_vars(OLD_PLAN), wu.BAT)
B, E = markers.BLOCK_BEGIN, markers.BLOCK_END
USER = 'export COMMANDLINE_ARGS="--api --listen"\n'

DUMP = ("import json, os, shlex\nprint(json.dumps({k: os.environ.get(k) for k in "
        "('COMMANDLINE_ARGS', 'NO_TCMALLOC', 'PYTORCH_CUDA_ALLOC_CONF')}))\n")


def _source(tree: Path) -> dict[str, str | None]:
    (tree / "dump_env.py").write_text(DUMP)
    out = subprocess.run(["bash", "-c", 'cd "$1" && { source ./webui-user.sh; } >/dev/null 2>&1; exec "$2" dump_env.py',
                          "bash", str(tree), sys.executable], capture_output=True, text=True, check=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# (id, the user's webui-user.sh) — marker text that is the user's, never lowvram's block
SH_NOT_OURS = [
    ("heredoc", STOCK_WEBUI_USER_SH + USER + f"cat > /dev/null <<'EOF'\n{SH_COPY}EOF\n"),
    ("heredoc-dash-unquoted", USER + f"cat >/dev/null <<-NOTES\n{SH_COPY}\tNOTES\necho after\n"),
    ("heredoc-then-more-lines", f"cat >/dev/null <<EOF\n{SH_COPY}EOF\n" + USER + "export MY_VAR=1\n"),
    ("colon-no-op-comment", USER + f": '\n{SH_COPY}'\n"),
    ("multi-line-single-quoted-string", USER + f"NOTES='saved for later:\n{SH_COPY}'\n"),
    ("multi-line-double-quoted-string", USER + f'NOTES="\n{B}\nsee the docs\n{E}\n"\n'),
    ("if-false-body", USER + f"if false; then\n{SH_COPY}fi\n"),
    ("if-elif-body", USER + f'if [ -n "$X" ]; then\n:\nelif false; then\n{SH_COPY}else\n:\nfi\n'),
    ("function-body", USER + f"old_lowvram() {{\n{SH_COPY}}}\n"),
    ("case-body", USER + f'case "$X" in\n  never)\n{SH_COPY};;\nesac\n'),
    ("while-body", USER + f"while false; do\n{SH_COPY}done\n"),
    ("subshell", USER + f"(\n{SH_COPY})\n"),
    ("command-substitution", USER + f"X=$(cat <<EOF\n{SH_COPY}EOF\n)\n"),
    ("comments-between-markers", USER + f"{B}\n# the tool writes its exports here\n{E}\n"),
    ("commented-out-block", USER + f"{B}\n#export COMMANDLINE_ARGS=\"--lowvram\"\n{E}\n"),
    ("markers-swapped", USER + f"{E}\n{B}\n# notes\n"),
    ("indented-markers", USER + "".join("  " + x + "\n" for x in SH_COPY.splitlines())),
    ("after-a-continued-line", USER + f"echo notes \\\n{SH_COPY}"),
    ("end-marker-only", USER + f"{E}\n"),
    ("return-inside-a-function", USER + 'f() {\n  return 0\n}\n[ -n "$NEVER" ] && return\n'
     + f"if false; then\n{SH_COPY}fi\n"),
    ("crlf-copy-in-heredoc", USER + "cat >/dev/null <<'EOF'\n" + SH_COPY.replace("\n", "\r\n") + "EOF\n"),
]


@pytest.mark.parametrize("original", [c[1] for c in SH_NOT_OURS], ids=[c[0] for c in SH_NOT_OURS])
def test_sh_marker_text_that_is_not_lowvrams_block_stays_and_the_plan_is_in_effect(tmp_path: Path,
                                                                                   original: str) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=original, venv=False, family=None)
    path = tree / "webui-user.sh"
    user_env = _source(tree)
    apply_plan(PLAN, tree, linux_facts())
    data = path.read_bytes()
    assert data.startswith(original.encode()), "the user's own text changed"
    got = _source(tree)
    assert got["NO_TCMALLOC"] == "True" and got["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    assert (got["COMMANDLINE_ARGS"] or "").endswith("--medvram-sdxl --xformers")
    assert got["COMMANDLINE_ARGS"] == " ".join(x for x in (user_env["COMMANDLINE_ARGS"], "--medvram-sdxl --xformers")
                                               if x)
    apply_plan(PLAN, tree, linux_facts())
    assert path.read_bytes() == data  # idempotent: its own block found again, the user's left alone
    path.write_bytes(data + b"export LATER=1\n")  # changed since: revert takes out only its block
    revert(tree)
    assert path.read_bytes() == original.encode() + b"export LATER=1\n"


def test_sh_a_real_block_after_marker_text_in_a_heredoc_is_replaced_in_place(tmp_path: Path) -> None:
    original = USER + f"cat >/dev/null <<'EOF'\n{SH_COPY}EOF\n"
    tree = make_webui(tmp_path / "w", webui_user_sh=original, venv=False, family=None)
    apply_plan(OLD_PLAN, tree, linux_facts())
    apply_plan(PLAN, tree, linux_facts())  # replaces its own block, not the heredoc's text
    data = (tree / "webui-user.sh").read_bytes()
    assert data == original.encode() + wu.render_block(wu.block_vars(PLAN), wu.SH).encode()
    revert(tree)
    assert (tree / "webui-user.sh").read_bytes() == original.encode()


# (id, the user's webui-user.sh, words of the one-line refusal) — lowvram cannot tell: it refuses
SH_CANNOT_TELL = [
    ("two-copies-at-top-level", USER + SH_COPY + SH_COPY, "2 copies"),
    ("damaged-no-end-marker", USER + SH_COPY.replace(E + "\n", ""), "end marker is missing"),
    ("users-line-inside-a-block", USER + SH_COPY.replace(E, "echo mine\n" + E), "not one lowvram writes"),
    ("blank-line-inside-a-block", USER + SH_COPY.replace(E, "\n" + E), "not one lowvram writes"),
    ("ends-inside-a-heredoc", USER + "cat <<EOF\nnever closed\n", "here-document"),
    ("ends-inside-an-if", USER + "if true; then\n  export A=1\n", "never run"),
    ("block-after-a-top-level-return", USER + "return 0\n" + SH_COPY, "never run"),
    ("syntax-error-before-a-marker", "fi\n" + USER + SH_COPY, "bash cannot read"),
]


@pytest.mark.parametrize(("original", "words"), [c[1:] for c in SH_CANNOT_TELL], ids=[c[0] for c in SH_CANNOT_TELL])
def test_sh_where_lowvram_cannot_tell_it_refuses_and_changes_nothing(tmp_path: Path, original: str,
                                                                     words: str) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=original, venv=False, family=None)
    with pytest.raises(ApplyError) as info:
        apply_plan(PLAN, tree, linux_facts())
    assert words in info.value.message and info.value.hint
    assert (tree / "webui-user.sh").read_bytes() == original.encode()


def test_sh_a_users_copy_of_an_older_block_is_told_apart_by_the_manifest(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=USER, venv=False, family=None)
    apply_plan(PLAN, tree, linux_facts())
    path = tree / "webui-user.sh"
    applied = path.read_bytes()
    path.write_bytes(SH_COPY.encode() + applied)  # the user pastes an old block at the top
    apply_plan(PLAN, tree, linux_facts())  # the manifest's block_sha256 says which one is lowvram's
    assert path.read_bytes() == SH_COPY.encode() + applied
    revert(tree)
    assert path.read_bytes() == SH_COPY.encode() + USER.encode()


# --------------------------------------------------------------------------------------------- .bat

BAT_USER = "set COMMANDLINE_ARGS=--api\r\n"
BAT_HEAD = "@echo off\r\n"
CALL = "call webui.bat\r\n"
BB, BE = markers.BAT_BLOCK_BEGIN, markers.BAT_BLOCK_END
BAT_NOT_OURS = [
    ("if-body", BAT_HEAD + BAT_USER + f"if exist no-such-file (\r\n{BAT_COPY})\r\n" + CALL),
    ("for-body", BAT_HEAD + BAT_USER + f"for %%x in (*.no-such-files) do (\r\n{BAT_COPY})\r\n" + CALL),
    ("else-body", BAT_HEAD + BAT_USER + f"if exist webui.bat (\r\n  rem\r\n) else (\r\n{BAT_COPY})\r\n" + CALL),
    ("goto-skipped", BAT_HEAD + BAT_USER + f"goto :skip\r\n{BAT_COPY}:skip\r\n" + CALL),
    ("after-exit-b-in-a-subroutine", BAT_HEAD + BAT_USER + "call :sub\r\n" + CALL + f"exit /b\r\n:sub\r\nexit /b\r\n{BAT_COPY}"),
    ("comments-between-markers", BAT_HEAD + BAT_USER + f"{BB}\r\nrem my notes\r\n{BE}\r\n" + CALL),
    # (these two run the copy's lines: the user's own, which the result keeps, before lowvram's)
    ("continued-line", BAT_HEAD + BAT_USER + f"echo notes ^\r\n{BAT_COPY}" + CALL),
    ("indented", BAT_HEAD + BAT_USER + "".join("  " + x + "\r\n" for x in BAT_COPY.splitlines()) + CALL),
]


def _run_bat(tree: Path) -> dict[bytes, bytes]:
    (tree / "webui.bat").write_bytes(b'@echo off\r\n>"%~dp0env.txt" set\r\n')
    return wine_cmd(tree)


@pytest.mark.wine
@pytest.mark.skipif(shutil.which("wine") is None, reason="wine is not installed (Debian package `wine`)")
@pytest.mark.parametrize("original", [c[1] for c in BAT_NOT_OURS], ids=[c[0] for c in BAT_NOT_OURS])
def test_bat_marker_text_that_is_not_lowvrams_block_stays_and_the_plan_is_in_effect(tmp_path: Path,
                                                                                    original: str) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=original, venv=False, family=None)
    path = tree / "webui-user.bat"
    baseline = _run_bat(tree)[b"COMMANDLINE_ARGS"]  # what the user's own lines set
    apply_plan(PLAN, tree, linux_facts("windows"))
    data = path.read_bytes()
    block = wu.render_block(wu.block_vars(PLAN), wu.BAT).encode()
    assert data.count(block) == 1 and data.replace(block, b"") == original.encode()
    got = _run_bat(tree)
    assert got[b"COMMANDLINE_ARGS"] == baseline + b" --medvram-sdxl --xformers"
    assert got[b"NO_TCMALLOC"] == b"True"
    apply_plan(PLAN, tree, linux_facts("windows"))
    assert path.read_bytes() == data
    revert(tree)
    assert path.read_bytes() == original.encode()


BAT_CANNOT_TELL = [
    ("two-copies", BAT_HEAD + BAT_USER + BAT_COPY + BAT_COPY + CALL, "2 copies"),
    ("damaged-no-end-marker", BAT_HEAD + BAT_USER + BAT_COPY.replace(BE + "\r\n", "") + CALL, "damaged"),
    ("damaged-at-the-end", BAT_HEAD + BAT_USER + CALL + BAT_COPY.replace(BE + "\r\n", ""), "end marker is missing"),
    ("users-line-inside", BAT_HEAD + BAT_USER + BAT_COPY.replace(BE, "echo mine\r\n" + BE) + CALL,
     "not one lowvram writes"),
]


@pytest.mark.parametrize(("original", "words"), [c[1:] for c in BAT_CANNOT_TELL], ids=[c[0] for c in BAT_CANNOT_TELL])
def test_bat_where_lowvram_cannot_tell_it_refuses_and_changes_nothing(tmp_path: Path, original: str,
                                                                      words: str) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=original, venv=False, family=None)
    with pytest.raises(ApplyError) as info:
        apply_plan(PLAN, tree, linux_facts("windows"))
    assert words in info.value.message and info.value.hint
    assert (tree / "webui-user.bat").read_bytes() == original.encode()
    assert not (tree / "webui.settings.bat").exists()


def test_bat_call_line_inside_a_block_or_skipped_is_not_where_the_block_goes(tmp_path: Path) -> None:
    # Only a `call webui.bat` cmd runs at the top level counts; otherwise webui.settings.bat.
    original = STOCK_WEBUI_USER_BAT.replace("call webui.bat", "goto :eof\r\ncall webui.bat")
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=original, venv=False, family=None)
    apply_plan(PLAN, tree, linux_facts("windows"))
    assert (tree / "webui-user.bat").read_bytes() == original.encode()
    assert (tree / "webui.settings.bat").is_file()
    revert(tree)
    assert not (tree / "webui.settings.bat").exists()
