"""Paths and values with spaces, quotes, `$()`, backticks, `%VAR%`, `&` and newlines end up quoted,
never executed: the real CLI writes the block, then bash sources it (as webui.sh does), wine's cmd
runs the .bat, and the fake A1111 is launched from such a folder. A sentinel file that an executed
`$(touch …)` / `& echo … >` would create must not exist afterwards, and every value arrives exact.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.world import paths
from tests.conftest import REPO
from tests.fixtures.faults import GTX1070_LINUX, snapshot
from tests.fixtures.launchers import events, fake_env, make_fake_a1111
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT, make_webui

pytestmark = pytest.mark.skipif(os.name == "nt", reason="bash and wine stand in for the user's shells")

SENTINELS = [f"SENT{i}" for i in range(1, 10)]
# Every trick a shell could fall for; SENTn is what it would create if it ran the text.
HOSTILE_HOME = "home $(touch SENT1) `touch SENT2` 'q' %PATH% & echo x > SENT3 ^ |"
HOSTILE_TREE = 'sd webui $(touch SENT4) `touch SENT5` "dq" \'sq\' %USERPROFILE% & echo > SENT6\nline2'
HOSTILE_FLAG = "/models/$(touch SENT7)/`touch SENT8`/it's %PATH% & echo x > SENT9 ; rm -rf / #"
HOSTILE_CKPT = "sd $(touch SENT1) `touch SENT2`\n'x' %PATH%.safetensors"

PROFILE = ("description: hostile flag values\nextends: gtx1070-sdxl\nextensions: []\n"
           f"args: {json.dumps(['--ckpt-dir', HOSTILE_FLAG])}\n")


def no_sentinels(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for p in root.rglob("*"):
            if p.name in SENTINELS:
                found.append(str(p))
    return found


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / HOSTILE_HOME
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "evil.yaml").write_text(PROFILE)
    return home


def facts(tmp_path: Path, os_name: str) -> Path:
    data = json.loads(json.dumps(GTX1070_LINUX))
    data["system"]["os"] = os_name
    path = tmp_path / f"facts-{os_name}.json"
    path.write_text(json.dumps(data))
    return path


def lowvram(home: Path, cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOWVRAM_HOME": str(home), "PYTHONPATH": str(REPO), **extra}
    return subprocess.run([sys.executable, "-m", "lowvram", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_block_sourced_by_bash_runs_nothing_and_keeps_every_value(tmp_path: Path, home: Path) -> None:
    tree = make_webui(tmp_path / "webui", checkpoint=HOSTILE_CKPT, venv=False)
    with (tree / "webui-user.sh").open("a") as fh:
        fh.write("export COMMANDLINE_ARGS=\"--api --port 7861\"\n")
    original = snapshot(tree)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = lowvram(home, cwd, "apply", "--webui", str(tree), "--facts", str(facts(tmp_path, "linux")),
                   "--profile", "evil")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "vars.bin"
    script = 'source ./webui-user.sh && printf "%s\\0" "$COMMANDLINE_ARGS" "$LOWVRAM_CONFIG" > "$1"'
    subprocess.run(["bash", "-c", script, "bash", str(out)], cwd=tree, check=True, timeout=30,
                   env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    args, config, _ = out.read_bytes().decode().split("\0")
    assert no_sentinels(tmp_path) == []
    tokens = shlex.split(args)  # what A1111 does with it
    assert tokens[:3] == ["--api", "--port", "7861"]
    assert tokens[tokens.index("--ckpt-dir") + 1] == HOSTILE_FLAG
    assert config == str(paths.hook_config_path(tree.resolve())).replace(str(paths.state_dir()), str(home))
    assert HOSTILE_HOME in config
    assert lowvram(home, cwd, "revert", "--webui", str(tree)).returncode == 0
    assert snapshot(tree) == original


def test_a_line_break_in_a_value_is_refused_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home\nexport EVIL=1"
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "evil.yaml").write_text(PROFILE)
    tree = make_webui(tmp_path / "webui", venv=False)
    before = snapshot(tree)
    done = lowvram(home, tmp_path, "apply", "--webui", str(tree), "--facts", str(facts(tmp_path, "linux")),
                   "--profile", "evil")
    assert done.returncode == 1
    assert "line break" in done.stderr and "hint:" in done.stderr
    assert "Traceback" not in done.stderr and "unexpected error" not in done.stderr
    assert snapshot(tree) == before


def test_a_double_quote_in_a_bat_value_is_refused_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / 'home "quoted"'
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "evil.yaml").write_text(PROFILE)
    tree = make_webui(tmp_path / "webui", webui_user_sh=None, webui_user_bat=STOCK_WEBUI_USER_BAT, venv=False)
    before = snapshot(tree)
    done = lowvram(home, tmp_path, "apply", "--webui", str(tree), "--facts", str(facts(tmp_path, "windows")),
                   "--profile", "evil")
    assert done.returncode == 1
    assert "double quote" in done.stderr and "hint:" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(tree) == before


def test_a_linux_lowvram_home_is_never_written_into_a_bat(tmp_path: Path, home: Path) -> None:
    # Facts from a Linux box writing the Windows files: the hook config's path is a Linux one, which
    # the UI on Windows cannot open (issue 14): one clear line, nothing written.
    tree = make_webui(tmp_path / "webui", webui_user_sh=None, webui_user_bat=STOCK_WEBUI_USER_BAT, venv=False)
    before = snapshot(tree)
    done = lowvram(home, tmp_path, "apply", "--webui", str(tree), "--facts", str(facts(tmp_path, "windows")),
                   "--profile", "evil")
    assert done.returncode == 1
    assert "Linux path" in done.stderr and "hint:" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(tree) == before
    assert no_sentinels(tmp_path) == []


@pytest.mark.wine
@pytest.mark.skipif(shutil.which("wine") is None, reason="wine is not installed (Debian package `wine`)")
def test_bat_run_by_cmd_runs_nothing_and_keeps_every_value(tmp_path: Path) -> None:
    from lowvram.world.apply import apply_plan, revert
    from tests.fixtures.git_repos import linux_facts, simple_plan

    tree = make_webui(tmp_path / "webui", webui_user_sh=None, webui_user_bat=STOCK_WEBUI_USER_BAT.replace(
        "set COMMANDLINE_ARGS=", "set COMMANDLINE_ARGS=--api"), venv=False)
    original = snapshot(tree)
    config = "C:\\" + HOSTILE_HOME.replace("/", "\\") + "\\hook.json"  # where lowvram on Windows keeps it
    apply_plan(simple_plan(args=("--xformers", "--ckpt-dir", HOSTILE_FLAG), env={"LOWVRAM_CONFIG": config}), tree,
               linux_facts("windows"))
    (tree / "webui.bat").write_bytes(b'@echo off\r\nset > "%~dp0env.txt"\r\n')
    env = {k: v for k, v in os.environ.items() if k != "COMMANDLINE_ARGS"}
    subprocess.run(["wine", "cmd", "/c", "webui-user.bat"], cwd=tree, env={**env, "WINEDEBUG": "-all"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180, stdin=subprocess.DEVNULL,
                   check=False)
    got = {}
    for line in (tree / "env.txt").read_bytes().decode("ascii", "replace").splitlines():
        name, sep, value = line.partition("=")
        if sep:
            got[name.upper()] = value
    assert no_sentinels(tmp_path) == []
    tokens = shlex.split(got["COMMANDLINE_ARGS"])
    assert tokens[0] == "--api"
    assert tokens[tokens.index("--ckpt-dir") + 1] == HOSTILE_FLAG
    assert got["LOWVRAM_CONFIG"] == config
    (tree / "webui.bat").write_bytes(original["webui.bat"])
    (tree / "env.txt").unlink()
    revert(tree)
    assert snapshot(tree) == original


def test_launch_from_a_hostile_folder_runs_nothing_and_the_ui_gets_exact_values(tmp_path: Path,
                                                                                home: Path) -> None:
    tree = make_fake_a1111(tmp_path / HOSTILE_TREE, checkpoint=HOSTILE_CKPT)
    # The fixture's stand-in for venv/bin/activate writes VIRTUAL_ENV="<path>" (as CPython's own
    # activate script does), which runs a $(…) in the venv's path by itself: that is the venv's
    # problem, not lowvram's, so quote it here to test what lowvram controls.
    venv = tree / "venv"
    (venv / "bin" / "activate").write_text(f"VIRTUAL_ENV={shlex.quote(str(venv))}\nexport VIRTUAL_ENV\n"
                                           'PATH="$VIRTUAL_ENV/bin:$PATH"\nexport PATH\n')
    record = tmp_path / "record.jsonl"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    done = lowvram(home, tmp_path, "launch", "--webui", str(tree), "--facts", str(facts(tmp_path, "linux")),
                   "--profile", "evil", LOWVRAM_MIRROR=str(mirror), **fake_env(record, light="1"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert no_sentinels(tmp_path) == []
    start, parsed = events(record, "start"), events(record, "parsed")
    assert len(start) == 1 and start[0]["cwd"] == str(tree.resolve())
    argv = parsed[0]["argv"]
    assert argv[argv.index("--ckpt-dir") + 1] == HOSTILE_FLAG
    assert HOSTILE_HOME in start[0]["env"]["LOWVRAM_CONFIG"]
    assert not (tmp_path / "stable-diffusion-webui").exists()  # webui.sh never re-cloned beside it
