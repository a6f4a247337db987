"""Issue 14 class 1: the user's own COMMANDLINE_ARGS in webui-user.bat, hostile to cmd's parser.

Each value is set by the user's own `set` line above the block, in both forms (`set X=…` and
`set "X=…"`), escaped as a user would have to for cmd to give exactly that value. The file runs for
real under wine's `cmd`: first without lowvram's block (the baseline: what the user's line sets),
then after `lowvram apply`. The program webui.bat launches must get exactly the baseline, a space
and the plan's flags, and nothing from the value may run (a sentinel file). Before the fix, the
block's `set "COMMANDLINE_ARGS=%COMMANDLINE_ARGS% …"` re-parsed the value: a `"` in it ended the
quoting and cmd ran the rest (`&`, `|`, `>`), ate carets, and cut the value short.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lowvram.core.errors import ApplyError
from lowvram.world.apply import apply_plan, revert
from lowvram.world.detect.webui import parse_bat_args
from tests.fixtures.git_repos import linux_facts, simple_plan
from tests.fixtures.webui_trees import make_webui

pytestmark = [
    pytest.mark.wine,
    pytest.mark.skipif(shutil.which("wine") is None, reason="wine is not installed (Debian package `wine`)"),
]

PLAN_ARGS = ("--medvram-sdxl", "--ckpt-dir", "C:\\100% models\\", "--gradio-auth", "me:a&b|c<d>e^f!g")
SENTINEL = "pwned"

# Stands in for webui.bat as A1111 1.8 writes it: webui.settings.bat first, then Python started
# through %PYTHON% (here a recorder of the environment the launched program gets).
WEBUI_BAT = ('@echo off\r\nif exist webui.settings.bat (\r\n    call webui.settings.bat\r\n)\r\n'
             'if not defined PYTHON (set PYTHON=python)\r\n%PYTHON% launch.py %*\r\n')
RECORDER = '@echo off\r\nif not "%~1"=="launch.py" exit /b 0\r\n>"%~dp0env.txt" set\r\nexit /b 0\r\n'
USER_BAT = ('@echo off\r\n\r\nset PYTHON=call "%~dp0rec.bat"\r\nset GIT=\r\nset VENV_DIR=-\r\n{extra}{line}\r\n\r\n'
            'call webui.bat\r\n')

# (id, the value the user wants COMMANDLINE_ARGS to hold). None of these may start with `=`.
HOSTILE = [
    ("amp-in-quoted-path", '--ckpt "C:\\R&D\\m.safetensors" --api'),
    ("pipe-runs-a-command", f'--gradio-auth "u:a|echo {SENTINEL}>{SENTINEL}.txt"'),
    ("amp-runs-a-command", f'--x "a&echo {SENTINEL}>{SENTINEL}.txt" --listen'),
    ("redirect-out", f'--x "a>{SENTINEL}.txt" --port 7861'),
    ("redirect-in", '--x "a<nul" --api'),
    ("caret", '--x "a^b" c^d ^'),
    ("trailing-caret", '--x "a^'),
    ("percent", '--x "100%" 50% done'),
    ("percent-var", '--x "%PATH%" %USERNAME%'),
    ("bang", '--x "a!b" !x! !'),
    ("unbalanced-quote", f'--x "unclosed & echo {SENTINEL}>{SENTINEL}.txt'),
    ("parentheses", '--x "(a)" ) ( --y (b)'),
    ("spaces-and-amp", '--ckpt-dir "D:\\my models\\R&D" --listen'),
    # FOR variables: %a/%b/%i are what scripts use; lowvram's loop uses %%J/%%K (wine, unlike
    # Windows, would scan a substituted value again for those two).
    ("for-variable-lookalikes", '--x %a %b %i %~dpb "%%b" %~nxa %~dp0 %*'),
    ("equals-semicolons-commas", "--x a=b;c,d --y=1 ;e"),
    ("trailing-spaces", "--api   "),
    ("only-quotes", '""'),
    ("unicode", '--x "caf\u00e9 \u2603" \u00fc'),
]


def user_line(value: str, quoted: bool, name: str = "COMMANDLINE_ARGS") -> str:
    """The `set` line a user writes so that cmd gives `name` exactly `value`: `%` doubled, and
    `& | < > ^ ( )` escaped with `^` wherever cmd reads them outside double quotes."""
    out: list[str] = []
    q = quoted
    for c in value:
        if c == '"':
            q = not q
            out.append(c)
        elif c == "%":
            out.append("%%")
        elif not q and c in "&|<>^()":
            out.append("^" + c)
        else:
            out.append(c)
    body = "".join(out)
    return f'set "{name}={body}"' if quoted else f"set {name}={body}"


def wine_cmd(tree: Path, bat: str = "webui-user.bat") -> dict[bytes, bytes]:
    """Run `bat` with wine's cmd in `tree`: the environment its launched program recorded (env.txt).

    Output goes to a file, not a pipe (wine's services inherit a pipe and hold it open for seconds).
    A run that leaves no env.txt is tried once more (wine's own start can fail while another test
    stops the wineserver); a second miss fails with what cmd printed.
    """
    env = dict(os.environ, WINEDEBUG="-all")
    for var in ("COMMANDLINE_ARGS", "NO_TCMALLOC", "LOWVRAM_CONFIG", "PYTORCH_CUDA_ALLOC_CONF"):
        env.pop(var, None)
    log = tree.parent / "wine-output.txt"
    for _attempt in range(2):
        (tree / "env.txt").unlink(missing_ok=True)
        with open(log, "wb") as out:
            subprocess.run(["wine", "cmd", "/c", bat], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=120, check=False)
        if (tree / "env.txt").is_file():
            break
    else:
        pytest.fail(f"{bat} recorded nothing under wine: {log.read_bytes()[-2000:]!r}")
    got: dict[bytes, bytes] = {}
    for line in (tree / "env.txt").read_bytes().split(b"\r\n"):
        name, sep, value = line.partition(b"=")
        if sep and name:
            got[name.upper()] = value
    return got


def _run(tree: Path, bat: str = "webui-user.bat") -> dict[bytes, bytes]:
    """`wine_cmd` with the stand-in webui.bat and its recorder."""
    (tree / "webui.bat").write_bytes(WEBUI_BAT.encode())
    (tree / "rec.bat").write_bytes(RECORDER.encode())
    return wine_cmd(tree, bat)


def _tree(tmp_path: Path, line: str, extra: str = "") -> Path:
    tree = make_webui(tmp_path / "w", webui_user_sh=None, venv=False, family=None)
    (tree / "webui-user.bat").write_bytes(USER_BAT.format(line=line, extra=extra).encode("utf-8"))
    return tree


def _plan_suffix() -> bytes:
    return b" " + " ".join(shlex.quote(a) for a in PLAN_ARGS).encode()


@pytest.mark.parametrize("quoted", [False, True], ids=["set-X=", 'set-"X="'])
@pytest.mark.parametrize("value", [v for _, v in HOSTILE], ids=[i for i, _ in HOSTILE])
def test_hostile_user_value_reaches_the_program_exactly(tmp_path: Path, value: str, quoted: bool) -> None:
    tree = _tree(tmp_path, user_line(value, quoted))
    original = (tree / "webui-user.bat").read_bytes()
    baseline = _run(tree)[b"COMMANDLINE_ARGS"]
    # (wine reads `set "X=…"` with quotes inside it differently from Windows; the baseline is the oracle)
    if value.isascii() and not (quoted and '"' in value):
        assert baseline == value.encode(), "the table's own `set` line does not give the value it names"
        if value.count('"') % 2 == 0:  # lowvram reads the user's line as cmd does (for its checks)
            assert parse_bat_args(original.decode()) == (tuple(shlex.split(value)), True)
    apply_plan(simple_plan(args=PLAN_ARGS, env={}), tree, linux_facts("windows"))
    got = _run(tree)
    assert got[b"COMMANDLINE_ARGS"] == baseline + _plan_suffix()
    assert not list(tree.glob(f"{SENTINEL}*")), "a command from the user's value ran"
    if value.isascii() and value.count('"') % 2 == 0:  # what A1111's shlex.split makes of it
        assert shlex.split(got[b"COMMANDLINE_ARGS"].decode())[-len(PLAN_ARGS):] == list(PLAN_ARGS)
    revert(tree)
    assert (tree / "webui-user.bat").read_bytes() == original


def test_edits_of_the_users_line_after_apply_reach_the_program(tmp_path: Path) -> None:
    """Class 6 on Windows: the block appends to the live value; it never holds a frozen copy."""
    tree = _tree(tmp_path, user_line('--listen --ckpt "C:\\R&D\\m.safetensors"', False))
    apply_plan(simple_plan(args=("--medvram-sdxl",), env={}, merge="assign", user_args_kept=("--listen",)), tree,
               linux_facts("windows"))
    data = (tree / "webui-user.bat").read_bytes()
    (tree / "webui-user.bat").write_bytes(data.replace(b"set COMMANDLINE_ARGS=--listen",
                                                       b"set COMMANDLINE_ARGS=--port 7000 --listen"))
    got = _run(tree)[b"COMMANDLINE_ARGS"]
    assert got == b'--port 7000 --listen --ckpt "C:\\R&D\\m.safetensors" --medvram-sdxl'


def test_unset_value_gets_only_the_plans_flags_and_prefixed_names_are_left_alone(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "set COMMANDLINE_ARGS=", extra=user_line("zzz & keep", False, "COMMANDLINE_ARGS_OLD") + "\r\n")
    apply_plan(simple_plan(args=PLAN_ARGS, env={}), tree, linux_facts("windows"))
    got = _run(tree)
    assert got[b"COMMANDLINE_ARGS"] == _plan_suffix()[1:]
    assert got[b"COMMANDLINE_ARGS_OLD"] == b"zzz & keep"


def test_lowercase_name_and_a_variable_with_the_same_prefix(tmp_path: Path) -> None:
    extra = user_line("--other", False, "COMMANDLINE_ARGS2") + "\r\n"
    tree = _tree(tmp_path, user_line('--x "a&b"', False, "commandline_args"), extra=extra)
    apply_plan(simple_plan(args=("--medvram",), env={}), tree, linux_facts("windows"))
    got = _run(tree)
    assert got[b"COMMANDLINE_ARGS"] == b'--x "a&b" --medvram'
    assert got[b"COMMANDLINE_ARGS2"] == b"--other"


def test_plan_flags_with_percent_letters_are_not_taken_for_for_variables(tmp_path: Path) -> None:
    args = ("--ckpt-dir", "C:\\%a%b\\%~dpb %%a\\")
    tree = _tree(tmp_path, user_line('--x "%a" %b', False))
    apply_plan(simple_plan(args=args, env={"LOWVRAM_CONFIG": "C:\\a %b\\h.json"}), tree, linux_facts("windows"))
    got = _run(tree)
    assert got[b"COMMANDLINE_ARGS"] == b'--x "%a" %b ' + " ".join(shlex.quote(a) for a in args).encode()
    assert got[b"LOWVRAM_CONFIG"] == b"C:\\a %b\\h.json"


# --------------------------------------------------------------------------------------------- Linux paths


def test_a_wsl_path_to_a_windows_drive_is_written_as_windows_sees_it(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "set COMMANDLINE_ARGS=--api")
    apply_plan(simple_plan(args=("--medvram",), env={"LOWVRAM_CONFIG": "/mnt/c/Users/me/lowvram/hook.json"}), tree,
               linux_facts("windows"))
    assert _run(tree)[b"LOWVRAM_CONFIG"] == b"C:\\Users\\me\\lowvram\\hook.json"


@pytest.mark.parametrize("value", ["/home/me/.local/state/lowvram/webuis/x/hook.json", "/mnt/wsl/x", "//srv/x"])
def test_a_linux_path_is_never_written_into_a_bat(tmp_path: Path, value: str) -> None:
    tree = _tree(tmp_path, "set COMMANDLINE_ARGS=--api")
    before = (tree / "webui-user.bat").read_bytes()
    with pytest.raises(ApplyError) as info:
        apply_plan(simple_plan(args=("--medvram",), env={"LOWVRAM_CONFIG": value}), tree, linux_facts("windows"))
    assert "Linux path" in info.value.message and "LOWVRAM_HOME" in info.value.hint
    assert (tree / "webui-user.bat").read_bytes() == before


def test_hook_config_from_a_linux_lowvram_home_is_refused_not_written(tmp_path: Path) -> None:
    # apply with the hook: LOWVRAM_CONFIG is lowvram's own state dir, here a Linux path.
    tree = _tree(tmp_path, "set COMMANDLINE_ARGS=--api")
    before = (tree / "webui-user.bat").read_bytes()
    with pytest.raises(ApplyError, match="Linux path"):
        apply_plan(simple_plan(args=("--medvram",), env={}, hook=True), tree, linux_facts("windows"))
    assert (tree / "webui-user.bat").read_bytes() == before


# --------------------------------------------------------------------------------------------- A1111's own webui.bat

# LOWVRAM_E2E_A1111 names a build folder holding stable-diffusion-webui/, as in tests/e2e/conftest.py.
REAL_A1111 = Path(os.environ.get("LOWVRAM_E2E_A1111", "/work/e2e/real-a1111")) / "stable-diffusion-webui"


@pytest.mark.skipif(not (REAL_A1111 / "webui.bat").is_file(), reason="no real A1111 tree (LOWVRAM_E2E_A1111)")
def test_a1111_own_webui_bat_launches_python_with_the_exact_value(tmp_path: Path) -> None:
    tree = _tree(tmp_path, user_line(f'--ckpt "C:\\R&D\\m.safetensors" --x "a|echo {SENTINEL}>{SENTINEL}.txt"', False))
    apply_plan(simple_plan(args=PLAN_ARGS, env={}), tree, linux_facts("windows"))
    (tree / "rec.bat").write_bytes(RECORDER.encode())
    shutil.copyfile(REAL_A1111 / "webui.bat", tree / "webui.bat")
    args = wine_cmd(tree)[b"COMMANDLINE_ARGS"]
    got = b"COMMANDLINE_ARGS=" + args
    assert got == (b'COMMANDLINE_ARGS=--ckpt "C:\\R&D\\m.safetensors" --x "a|echo pwned>pwned.txt"'
                   + _plan_suffix())
    assert not list(tree.glob(f"{SENTINEL}*"))
