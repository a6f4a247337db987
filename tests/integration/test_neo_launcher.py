"""Forge Neo's launcher: apply writes where its webui.sh reads (webui.settings.sh), launch starts it the way
its user does, and both shells really run (tests/fixtures/neo_launcher.py; LOWVRAM_NEO_LAUNCHER=DIR runs the
same tests on Neo's own webui.sh and webui-user.sh)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_lowvram
from tests.fixtures.faults import GTX1650_LINUX
from tests.fixtures.neo_launcher import launched, make_neo_tree
from tests.fixtures.webui_trees import make_webui

pytestmark = pytest.mark.skipif(os.name == "nt", reason="Neo's webui.sh is a bash script")


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    path = tmp_path / "gtx1650.json"
    path.write_text(json.dumps(GTX1650_LINUX))
    return path


def tree_bytes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "tmp" and p.name != "launched.json"}


def plan_flags(root: Path, facts: Path) -> list[str]:
    done = run_lowvram("plan", "--json", "--facts", str(facts), "--webui", str(root))
    assert done.returncode == 0, done.stderr
    args = json.loads(done.stdout)["args"]
    assert args, "the plan for a 4 GB card adds flags"
    return list(args)


def run_shell(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COMMANDLINE_ARGS", "PYTHON", "VENV_DIR")}
    return subprocess.run(["bash", script], cwd=root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=60)


def test_apply_writes_webui_settings_sh_where_neos_webui_sh_reads_it(tmp_path: Path, facts: Path) -> None:
    root = make_neo_tree(tmp_path / "neo")
    before = tree_bytes(root)
    flags = plan_flags(root, facts)
    done = run_lowvram("apply", "--facts", str(facts), "--webui", str(root))
    assert done.returncode == 0, done.stderr
    assert "lowvram" in (root / "webui.settings.sh").read_text()
    assert tree_bytes(root)["webui-user.sh"] == before["webui-user.sh"]  # Neo never sources it: untouched

    # through webui-user.sh (exports --uv, execs webui.sh) and through webui.sh alone: launch.py sees the flags
    assert run_shell(root, "webui-user.sh").returncode in (0, 1)  # the final `read` at end of input
    assert run_shell(root, "webui.sh").returncode in (0, 1)
    via_user, via_sh = launched(root)
    assert via_user["argv"] == ["--uv", *flags]
    assert via_sh["argv"] == flags

    done = run_lowvram("revert", "--webui", str(root))
    assert done.returncode == 0, done.stderr
    assert not (root / "webui.settings.sh").exists()  # lowvram made it: gone again
    assert tree_bytes(root) == before


def test_a_users_own_webui_settings_sh_keeps_its_lines_and_its_bytes(tmp_path: Path, facts: Path) -> None:
    root = make_neo_tree(tmp_path / "neo", webui_user=False)
    own = b'# mine\nexport COMMANDLINE_ARGS="--api --port 7861"\nexport GIT=git'  # no final newline
    (root / "webui.settings.sh").write_bytes(own)
    flags = plan_flags(root, facts)
    done = run_lowvram("apply", "--facts", str(facts), "--webui", str(root))
    assert done.returncode == 0, done.stderr
    assert (root / "webui.settings.sh").read_bytes().startswith(own)
    run_shell(root, "webui.sh")
    assert launched(root)[-1]["argv"] == ["--api", "--port", "7861", *flags]  # the user's value stays live
    assert run_lowvram("revert", "--webui", str(root)).returncode == 0
    assert (root / "webui.settings.sh").read_bytes() == own


def test_launch_runs_webui_user_sh_without_f_and_says_whose_exit_code(tmp_path: Path, facts: Path) -> None:
    root = make_neo_tree(tmp_path / "neo")
    flags = plan_flags(root, facts)
    dry = run_lowvram("launch", "--dry-run", "--json", "--facts", str(facts), "--webui", str(root))
    assert dry.returncode == 0, dry.stderr
    spec = json.loads(dry.stdout)["launch"]
    assert spec["argv"] == ["bash", "webui-user.sh"]  # no -f, even as root: Neo's launch.py would refuse it
    assert spec["stdin"] == "closed" and spec["exit_code_of"] == "webui.sh"
    assert "LAUNCH_SCRIPT" not in spec["env"]

    done = run_lowvram("launch", "--facts", str(facts), "--webui", str(root))
    assert launched(root)[-1]["argv"] == ["--uv", *flags]
    assert "webui.sh exited with code" in done.stderr.strip().splitlines()[-1]
    assert "not necessarily the UI's" in done.stderr


def test_launch_passes_extra_args_only_where_they_reach_launch_py(tmp_path: Path, facts: Path) -> None:
    with_user = make_neo_tree(tmp_path / "a")
    done = run_lowvram("launch", "--dry-run", "--facts", str(facts), "--webui", str(with_user), "--", "--port", "7861")
    assert done.returncode == 2
    assert "cannot reach webui.sh through webui-user.sh" in done.stderr and "Traceback" not in done.stderr

    bare = make_neo_tree(tmp_path / "b", webui_user=False)
    flags = plan_flags(bare, facts)
    done = run_lowvram("launch", "--facts", str(facts), "--webui", str(bare), "--",
                       "--port", "7861")
    assert launched(bare)[-1]["argv"] == ["--port", "7861", *flags]


def test_python_reaches_neos_webui_sh_as_PYTHON(tmp_path: Path, facts: Path) -> None:
    root = make_neo_tree(tmp_path / "neo", webui_user=False)
    spec = json.loads(run_lowvram("launch", "--dry-run", "--json", "--facts", str(facts), "--webui", str(root),
                                  "--python", "/usr/bin/python3").stdout)["launch"]
    assert spec["env"]["PYTHON"] == "/usr/bin/python3" and "python_cmd" not in spec["env"]


def test_a1111_webui_user_sh_that_execs_is_refused_in_one_line(tmp_path: Path, facts: Path) -> None:
    root = make_webui(tmp_path / "a1111", webui_user_sh='export COMMANDLINE_ARGS="--api"\nexec ./webui.sh "$@"\n')
    before = (root / "webui-user.sh").read_bytes()
    done = run_lowvram("apply", "--facts", str(facts), "--webui", str(root))
    assert done.returncode != 0
    assert "would never run" in done.stderr and "exec ./webui.sh" in done.stderr
    assert "Traceback" not in done.stderr
    assert (root / "webui-user.sh").read_bytes() == before


def test_doctor_reads_the_users_flags_beside_the_block_in_webui_settings_sh(tmp_path: Path, facts: Path) -> None:
    root = make_neo_tree(tmp_path / "neo")
    assert run_lowvram("apply", "--facts", str(facts), "--webui", str(root)).returncode == 0
    user = root / "webui-user.sh"
    user.write_text(user.read_text().replace('COMMANDLINE_ARGS="--uv"', 'COMMANDLINE_ARGS="--uv --novram"'))
    done = run_lowvram("doctor", "--json", "--webui", str(root))
    check = next(c for c in json.loads(done.stdout)["checks"] if c["id"] == "lowvram.applied")
    assert check["status"] == "warn" and "--novram" in check["message"], check


def test_a_webui_user_sh_that_does_not_start_webui_sh_gives_no_user_flags(tmp_path: Path) -> None:
    """Neo's webui.sh never sources webui-user.sh: its COMMANDLINE_ARGS count only where it starts webui.sh."""
    from lowvram.world.detect.webui import read_user_args

    root = make_neo_tree(tmp_path / "neo")
    assert read_user_args(root, "linux", "forge-neo") == (("--uv",), True)
    (root / "webui-user.sh").write_text('export COMMANDLINE_ARGS="--uv"\n')  # a leftover A1111-style file
    assert read_user_args(root, "linux", "forge-neo") == (None, True)
    (root / "webui.settings.sh").write_text('export COMMANDLINE_ARGS="--api"\n')
    assert read_user_args(root, "linux", "forge-neo") == (("--api",), True)
