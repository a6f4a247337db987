"""Issue 14 class 6: the user's own COMMANDLINE_ARGS line stays live after `lowvram apply`.

Before the fix, a user flag that contradicted the plan made the block copy the user's flags, frozen
at apply time (`export COMMANDLINE_ARGS="<their flags> <plan's>"`): every later edit of their own
line (`--listen`, `--port`) was silently ignored, and doctor kept saying "applied ok". Now the block
only appends, so edits reach the UI (real bash, wine's real cmd), and doctor re-reads the user's line
and reports a contradiction with the block that appeared after apply.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.world.apply import apply_plan
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.git_repos import linux_facts, simple_plan
from tests.fixtures.webui_trees import make_webui
from tests.integration.test_block_hostile_cmd import wine_cmd

DUMP = "import json, os, shlex\nprint(json.dumps(shlex.split(os.environ.get('COMMANDLINE_ARGS', ''))))\n"


def _argv_sh(tree: Path) -> list[str]:
    """What webui.sh does: source webui-user.sh, then start Python, which reads the environment."""
    (tree / "dump_args.py").write_text(DUMP)
    out = subprocess.run(["bash", "-c", 'cd "$1" && source ./webui-user.sh && exec "$2" dump_args.py', "bash",
                          str(tree), sys.executable], capture_output=True, text=True, check=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _edit(path: Path, old: str, new: str) -> None:
    """Edit the user's own line (the first occurrence: their line comes before lowvram's block)."""
    data = path.read_bytes()
    assert old.encode() in data
    path.write_bytes(data.replace(old.encode(), new.encode(), 1))


def _doctor(cli, tree: Path, facts: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    out = cli("doctor", "--webui", str(tree), "--facts", str(facts), "--json")
    return next(c for c in json.loads(out.out)["checks"] if c["id"] == "lowvram.applied")  # type: ignore[no-any-return]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "no-mirror"))  # extensions fail fast, offline


# (id, machine, the user's line, apply's extra arguments, edit of the user's line after apply,
#  flags the UI must then get in this order, flags it must not get)
EDITS = [
    ("profile-vs-users-lowvram", "gtx1070-8gb", "--lowvram --port 7861", ("--profile", "gtx1070-sdxl"),
     ("--port 7861", "--port 7000 --listen"), ["--lowvram", "--port", "7000", "--listen", "--xformers"],
     ["--medvram-sdxl", "7861"]),
    ("profile-vs-users-attention", "gtx1070-8gb", "--opt-sdp-attention --api", ("--profile", "gtx1070-sdxl"),
     ("--api", "--api --listen"), ["--opt-sdp-attention", "--api", "--listen"], ["--xformers"]),
    ("pinned-gpu-overrides-device-id", "two-gpus", "--device-id 1 --port 7861", (),
     ("--port 7861", "--port 7000 --share"), ["--device-id", "1", "--port", "7000", "--share", "--device-id", "0"],
     ["7861"]),
    ("no-contradiction", "gtx1070-8gb", "--api", ("--profile", "gtx1070-sdxl"),
     ("--api", "--api --port 7000"), ["--api", "--port", "7000", "--xformers"], []),
    ("user-line-removed-after-apply", "gtx1070-8gb", "--lowvram --listen", ("--profile", "gtx1070-sdxl"),
     ('export COMMANDLINE_ARGS="--lowvram --listen"', "# (removed)"), ["--xformers"], ["--lowvram", "--listen"]),
]


@pytest.mark.parametrize(("machine", "line", "extra", "edit", "want", "unwanted"), [e[1:] for e in EDITS],
                         ids=[e[0] for e in EDITS])
def test_edits_of_the_users_line_after_apply_reach_the_ui(cli, tmp_path: Path, offline: None, machine: str,  # type: ignore[no-untyped-def]
                                                          line: str, extra: tuple[str, ...], edit: tuple[str, str],
                                                          want: list[str], unwanted: list[str]) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=f'#!/bin/bash\nexport COMMANDLINE_ARGS="{line}"\n')
    facts = write_facts(MACHINES[machine], tmp_path / "facts.json")
    applied = cli("apply", "--webui", str(tree), "--facts", str(facts), *extra, "--json")
    assert applied.code in (0, 1), applied.err  # 1: an extension could not be fetched offline
    _edit(tree / "webui-user.sh", *edit)
    argv = _argv_sh(tree)
    it = iter(argv)
    assert all(flag in it for flag in want), argv  # in this order
    assert not set(unwanted) & set(argv), argv
    assert _doctor(cli, tree, facts)["status"] in ("ok", "warn")


# (id, edit of the user's line after apply, doctor's status, words its message must hold)
LATER = [
    ("adds-lowvram-vs-planned-medvram-sdxl", "--api --lowvram", "warn", ["--lowvram", "--medvram-sdxl", "offload"]),
    ("adds-sdp-vs-planned-xformers", "--api --opt-sdp-attention", "warn",
     ["--opt-sdp-attention", "--xformers", "attention"]),
    ("adds-medvram-vs-planned-medvram-sdxl", "--medvram --api", "warn", ["--medvram", "--medvram-sdxl"]),
    ("adds-listen", "--api --listen", "ok", ["in place"]),
    ("adds-a-planned-flag-again", "--api --xformers", "ok", ["in place"]),
]


@pytest.mark.parametrize(("new_line", "status", "words"), [e[1:] for e in LATER], ids=[e[0] for e in LATER])
def test_doctor_reports_a_contradiction_that_appeared_after_apply(cli, tmp_path: Path, offline: None,  # type: ignore[no-untyped-def]
                                                                  new_line: str, status: str, words: list[str]) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh='#!/bin/bash\nexport COMMANDLINE_ARGS="--api"\n')
    facts = write_facts(MACHINES["gtx1070-8gb"], tmp_path / "facts.json")
    applied = cli("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "gtx1070-sdxl",
                  "--offload", "medvram-sdxl", "--json")
    assert applied.code in (0, 1), applied.err
    assert _doctor(cli, tree, facts)["status"] == "ok"
    _edit(tree / "webui-user.sh", 'COMMANDLINE_ARGS="--api"', f'COMMANDLINE_ARGS="{new_line}"')
    check = _doctor(cli, tree, facts)
    assert check["status"] == status, check
    assert all(w in check["message"] for w in words), check
    if status == "warn":
        assert "lowvram apply" in check["hint"]
        # …and apply again plans around the user's flag: doctor is satisfied.
        again = cli("apply", "--webui", str(tree), "--facts", str(facts), "--json")
        assert again.code in (0, 1), again.err
        assert _doctor(cli, tree, facts)["status"] == "ok"


def test_doctor_pinned_device_flag_is_not_a_contradiction_but_a_new_port_is(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                            offline: None) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh='#!/bin/bash\nexport COMMANDLINE_ARGS="--device-id 1"\n')
    facts = write_facts(MACHINES["two-gpus"], tmp_path / "facts.json")
    assert cli("apply", "--webui", str(tree), "--facts", str(facts), "--json").code in (0, 1)
    assert _doctor(cli, tree, facts)["status"] == "ok"  # device 1 = the pinned GPU, renumbered 0
    _edit(tree / "webui-user.sh", '"--device-id 1"', '"--device-id 1 --lowvram"')
    check = _doctor(cli, tree, facts)
    assert check["status"] == "warn" and "--lowvram" in check["message"]


@pytest.mark.skipif(shutil.which("wine") is None, reason="wine is not installed (Debian package `wine`)")
@pytest.mark.wine
def test_bat_edits_after_apply_reach_the_program_and_doctor_sees_a_new_contradiction(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bat = '@echo off\r\nset COMMANDLINE_ARGS=--device-id 1 --port 7861\r\ncall webui.bat\r\n'
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=bat)
    plan = simple_plan(args=("--medvram-sdxl", "--device-id", "0"), env={"CUDA_VISIBLE_DEVICES": "GPU-aaaa"},
                       merge="assign", user_args_kept=("--port", "7861"))
    apply_plan(plan, tree, linux_facts("windows"))
    _edit(tree / "webui-user.bat", "--port 7861", "--port 7000 --listen")
    (tree / "webui.bat").write_bytes(b'@echo off\r\n>"%~dp0env.txt" set\r\n')
    value = wine_cmd(tree)[b"COMMANDLINE_ARGS"]
    assert shlex.split(value.decode()) == ["--device-id", "1", "--port", "7000", "--listen",
                                                            "--medvram-sdxl", "--device-id", "0"]
    facts = write_facts(MACHINES["rtx4060-8gb-win"], tmp_path / "facts.json")
    assert _doctor(cli, tree, facts)["status"] == "ok"
    _edit(tree / "webui-user.bat", "--listen", "--listen --lowvram")
    check = _doctor(cli, tree, facts)
    assert check["status"] == "warn" and "--lowvram" in check["message"] and "--medvram-sdxl" in check["message"]
