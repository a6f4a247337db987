"""The written webui-user.sh, sourced by bash as webui.sh does, hands exact values to the child Python."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.world import paths
from lowvram.world.apply import apply_plan
from tests.fixtures.git_repos import linux_facts, simple_plan
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_SH, make_webui

NASTY = "/models/my dir/it's \"quoted\" $HOME `touch pwned1` $(touch pwned2) 100% a&b;c\\d !x"
DUMP = ("import json, os, shlex, sys\n"
        "keys = ['COMMANDLINE_ARGS', 'LD_PRELOAD', 'PYTORCH_CUDA_ALLOC_CONF', 'LOWVRAM_CONFIG', 'NO_TCMALLOC']\n"
        "out = {k: os.environ.get(k) for k in keys}\n"
        "out['argv'] = shlex.split(os.environ.get('COMMANDLINE_ARGS', ''))\n"
        "print(json.dumps(out))\n")


def _source_and_dump(tree: Path) -> dict[str, object]:
    """What webui.sh does: source webui-user.sh, then start Python (which reads the environment)."""
    (tree / "dump_env.py").write_text(DUMP)
    script = 'cd "$1" && source ./webui-user.sh && exec "$2" dump_env.py'
    out = subprocess.run(["bash", "-c", script, "bash", str(tree), sys.executable], capture_output=True, text=True,
                         check=True, timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def spaced_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lowvram home with spaces $dollar 'q'"
    monkeypatch.setenv("LOWVRAM_HOME", str(home))
    return home


def test_values_reach_the_child_exactly_and_nothing_is_executed(tmp_path: Path, spaced_home: Path) -> None:
    tree = make_webui(tmp_path / "web ui", webui_user_sh=STOCK_WEBUI_USER_SH.replace(
        '#export COMMANDLINE_ARGS=""', 'export COMMANDLINE_ARGS="--api --port 7861"'))
    args = ("--xformers", "--ckpt-dir", NASTY)
    plan = simple_plan(args=args, env={"LD_PRELOAD": "/opt/lib dir/libtcmalloc_minimal.so.4",
                                       "PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6"}, hook=True)
    apply_plan(plan, tree, linux_facts())
    got = _source_and_dump(tree)
    # append mode: the user's own flags stay in force, the plan's follow
    assert got["argv"] == ["--api", "--port", "7861", *args]
    assert got["LD_PRELOAD"] == "/opt/lib dir/libtcmalloc_minimal.so.4"
    assert got["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    assert got["LOWVRAM_CONFIG"] == str(paths.hook_config_path(tree))
    assert "lowvram home with spaces $dollar 'q'" in str(got["LOWVRAM_CONFIG"])
    assert not list(tree.glob("pwned*"))
    assert not list(Path.cwd().glob("pwned*"))


def test_without_a_user_value_there_is_no_leading_space(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w")
    apply_plan(simple_plan(args=("--medvram-sdxl",), env={"NO_TCMALLOC": "True"}), tree, linux_facts())
    got = _source_and_dump(tree)
    assert got["COMMANDLINE_ARGS"] == "--medvram-sdxl"
    assert got["NO_TCMALLOC"] == "True"


def test_a_plan_that_overrides_user_flags_keeps_the_users_line_live(tmp_path: Path) -> None:
    # The block never freezes a copy of the user's flags (issue 14): an edit after apply takes effect,
    # and the plan's valued flag wins by coming later (argparse keeps a flag's last value).
    tree = make_webui(tmp_path / "w", webui_user_sh='export COMMANDLINE_ARGS="--device-id 1 --api"\n')
    plan = simple_plan(args=("--medvram-sdxl", "--device-id", "0"), env={}, merge="assign", user_args_kept=("--api",))
    apply_plan(plan, tree, linux_facts())
    path = tree / "webui-user.sh"
    path.write_bytes(path.read_bytes().replace(b'"--device-id 1 --api"', b'"--device-id 1 --api --port 7000"'))
    assert _source_and_dump(tree)["argv"] == ["--device-id", "1", "--api", "--port", "7000", "--medvram-sdxl",
                                              "--device-id", "0"]


def test_a1111_shlex_reads_the_same_flags_the_plan_has(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w")
    args = ("--ckpt-dir", "C:\\models\\", "--data-dir", "\\\\server\\share", "--gradio-auth", "me:p'w\"d")
    apply_plan(simple_plan(args=args, env={}), tree, linux_facts())
    got = _source_and_dump(tree)
    assert got["argv"] == list(args)
    assert shlex.split(str(got["COMMANDLINE_ARGS"])) == list(args)
