"""The written webui-user.bat run for real by wine's cmd: the values webui.bat sees are exact."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lowvram.world.apply import apply_plan, revert
from tests.fixtures.git_repos import linux_facts, simple_plan
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT, make_webui

pytestmark = [
    pytest.mark.wine,
    pytest.mark.skipif(shutil.which("wine") is None, reason="wine is not installed (Debian package `wine`)"),
]

# Stands in for webui.bat: like the real one it first calls webui.settings.bat when present,
# then records the environment Python would get.
WEBUI_BAT = ('@echo off\r\nif exist webui.settings.bat (\r\n    call webui.settings.bat\r\n)\r\n'
             'set > "%~dp0env.txt"\r\n')


def _run_cmd(tree: Path, bat: str) -> dict[str, str]:
    (tree / "webui.bat").write_bytes(WEBUI_BAT.encode())
    env = dict(os.environ, WINEDEBUG="-all")
    env.pop("COMMANDLINE_ARGS", None)
    subprocess.run(["wine", "cmd", "/c", bat], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
                   stdin=subprocess.DEVNULL, check=False)
    text = (tree / "env.txt").read_bytes().decode("ascii", "replace")
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            out[name.upper()] = value
    return out


def test_stock_bat_hands_exact_values_to_webui_bat(tmp_path: Path) -> None:
    user_bat = STOCK_WEBUI_USER_BAT.replace("set COMMANDLINE_ARGS=", "set COMMANDLINE_ARGS=--api --port 7861")
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=user_bat)
    args = ("--xformers", "--ckpt-dir", "C:\\100% models\\", "--gradio-auth", "me:a&b|c<d>e^f!g 'q'")
    plan = simple_plan(args=args, env={"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6",
                                       "LOWVRAM_CONFIG": "C:\\state\\50% done\\hook.json"})
    apply_plan(plan, tree, linux_facts("windows"))
    data = (tree / "webui-user.bat").read_bytes()
    assert data.index(b"rem >>> lowvram") < data.index(b"call webui.bat")
    got = _run_cmd(tree, "webui-user.bat")
    assert shlex.split(got["COMMANDLINE_ARGS"]) == ["--api", "--port", "7861", *args]
    assert got["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    assert got["LOWVRAM_CONFIG"] == "C:\\state\\50% done\\hook.json"
    revert(tree)
    assert (tree / "webui-user.bat").read_bytes() == user_bat.encode()


def test_stock_bat_without_user_flags(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=STOCK_WEBUI_USER_BAT)
    apply_plan(simple_plan(args=("--medvram-sdxl",), env={}), tree, linux_facts("windows"))
    got = _run_cmd(tree, "webui-user.bat")
    assert shlex.split(got["COMMANDLINE_ARGS"]) == ["--medvram-sdxl"]


def test_webui_settings_bat_is_called_by_webui_bat(tmp_path: Path) -> None:
    # A webui-user.bat without `call webui.bat`: the user starts webui.bat directly.
    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat="@echo off\r\nset GIT=\r\n")
    apply_plan(simple_plan(args=("--lowvram", "--ckpt-dir", "D:\\my models\\"), env={}), tree,
               linux_facts("windows"))
    assert (tree / "webui.settings.bat").exists()
    got = _run_cmd(tree, "webui.bat")
    assert shlex.split(got["COMMANDLINE_ARGS"]) == ["--lowvram", "--ckpt-dir", "D:\\my models\\"]
    revert(tree)
    assert not (tree / "webui.settings.bat").exists()
