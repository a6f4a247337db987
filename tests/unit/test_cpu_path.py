"""Issue 16 §7–8: a machine with no NVIDIA GPU.

§7: the UI's first start installs torch's CPU build (TORCH_COMMAND from PyTorch's CPU index), not the
CUDA one (2.3 GB of wheels); a TORCH_COMMAND of the user's wins; `setup` states the real download.
§8: `tune` has nothing to measure there (no reserve, no offload level) and refuses before it starts
anything; so does `tune --roads resident` with the layout hook off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import paths
from tests.fixtures.api_ui import ApiUi, make_api_webui, write_gtx1070_windows_facts
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.ui_repos import UiMirror, build_ui_mirror, pin_extensions
from tests.fixtures.webui_trees import make_webui

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
A1111_CPU = f"pip install torch==2.1.2 torchvision==0.16.2 --extra-index-url {CPU_INDEX}"
EXPECTED = {
    "a1111": A1111_CPU,
    "forge": f"pip install torch==2.3.1 torchvision==0.18.1 --extra-index-url {CPU_INDEX}",
    "sdnext": f"torch torchvision --index-url {CPU_INDEX}",  # SD.Next's TORCH_COMMAND is pip's arguments
}


@pytest.fixture
def no_gpu_facts(tmp_path: Path) -> Path:
    return write_facts(MACHINES["no-gpu"], tmp_path / "no-gpu.json")


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe as on a machine without an NVIDIA driver, whatever this one has."""
    from lowvram.world.detect import nvml
    from tests.fixtures.fake_nvml import no_driver

    monkeypatch.setattr(nvml, "pynvml", no_driver())


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory: no WebUI is found, so the plan is for a fresh install."""
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def _plan(cli: Any, *args: str) -> dict[str, Any]:
    res = cli("plan", "--json", *args)
    assert res.code == 0, res.err
    return dict(json.loads(res.out))


def _decision(plan: dict[str, Any], setting: str) -> dict[str, Any] | None:
    return next((d for d in plan["decisions"] if d["setting"] == setting), None)


# ---- §7 the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize("ui", ["a1111", "forge", "sdnext"])
def test_a_plan_without_an_nvidia_gpu_installs_torchs_cpu_build(cli: Any, no_gpu_facts: Path, nowhere: Path,
                                                                 ui: str) -> None:
    plan = _plan(cli, "--facts", str(no_gpu_facts), "--ui", ui, "--model", "sd15")
    assert plan["env"]["TORCH_COMMAND"] == EXPECTED[ui]
    assert "cu121" not in json.dumps(plan["env"]) and "cu130" not in json.dumps(plan["env"])
    decision = _decision(plan, "torch_install")
    assert decision is not None and decision["value"] == "cpu" and decision["source"] == "auto"
    assert "no NVIDIA GPU" in decision["reason"] and "CPU build" in decision["reason"]
    assert "TORCH_COMMAND of yours" in decision["reason"] and "wins" in decision["reason"]  # said, not hidden
    # The human view shows the row and the variable.
    text = cli("plan", "--facts", str(no_gpu_facts), "--ui", ui, "--model", "sd15")
    assert text.code == 0, text.err
    assert "torch_install" in text.out and f"TORCH_COMMAND={EXPECTED[ui]}" in text.out


def test_comfyui_has_no_installer_so_the_plan_says_which_command_to_run(cli: Any, no_gpu_facts: Path,
                                                                        nowhere: Path) -> None:
    plan = _plan(cli, "--facts", str(no_gpu_facts), "--ui", "comfyui", "--model", "sd15")
    assert "TORCH_COMMAND" not in plan["env"]
    decision = _decision(plan, "torch_install")
    assert decision is not None and decision["value"] == "cpu"
    assert "no installer" in decision["reason"]
    assert f"pip install torch torchvision --index-url {CPU_INDEX}" in decision["reason"]


@pytest.mark.parametrize("machine", ["gtx1070-8gb", "rtx4060-8gb-win", "amd-only"])
def test_an_nvidia_or_another_gpu_keeps_the_uis_own_torch(cli: Any, tmp_path: Path, nowhere: Path,
                                                          machine: str) -> None:
    """An NVIDIA GPU needs the CUDA build; an AMD one gets webui.sh's own ROCm choice (lowvram plans no
    CPU mode there), which a TORCH_COMMAND in the block would override."""
    plan = _plan(cli, "--facts", str(write_facts(MACHINES[machine], tmp_path / "f.json")))
    assert "TORCH_COMMAND" not in plan["env"]
    assert _decision(plan, "torch_install") is None


def test_a_venv_that_already_has_torch_is_left_as_it_is(cli: Any, tmp_path: Path, no_gpu_facts: Path) -> None:
    tree = make_webui(tmp_path / "webui", torch="2.1.2+cu121")
    plan = _plan(cli, "--facts", str(no_gpu_facts), "--webui", str(tree))
    assert "TORCH_COMMAND" not in plan["env"]
    decision = _decision(plan, "torch_install")
    assert decision is not None and decision["value"] is None
    assert "already has torch 2.1.2+cu121" in decision["reason"]


def test_an_older_a1111_gets_the_torch_it_pins(cli: Any, tmp_path: Path, no_gpu_facts: Path) -> None:
    tree = make_webui(tmp_path / "webui", version="1.7.0", torch=None, xformers=None)
    plan = _plan(cli, "--facts", str(no_gpu_facts), "--webui", str(tree))
    assert plan["env"]["TORCH_COMMAND"] == f"pip install torch==2.0.1 torchvision==0.15.2 --extra-index-url {CPU_INDEX}"


# ---- §7 the block: set only where the user set nothing ------------------------------------------


def _sourced(tree: Path, env: dict[str, str] | None = None) -> str:
    """TORCH_COMMAND as A1111's webui.sh sees it after sourcing webui-user.sh."""
    base = {k: v for k, v in os.environ.items() if k != "TORCH_COMMAND"}
    done = subprocess.run(["bash", "-c", 'source ./webui-user.sh && printf %s "$TORCH_COMMAND"'], cwd=tree,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def test_apply_writes_the_cpu_torch_command_and_the_users_own_wins(cli: Any, tmp_path: Path,
                                                                    no_gpu_facts: Path) -> None:
    tree = make_webui(tmp_path / "webui", torch=None, xformers=None)
    res = cli("apply", "--webui", str(tree), "--facts", str(no_gpu_facts))
    assert res.code == 0, res.err
    assert _sourced(tree) == A1111_CPU
    # Set in the environment webui.sh starts in: theirs.
    assert _sourced(tree, {"TORCH_COMMAND": "pip install torch==2.1.2+cpu --index-url /srv/wheels"}) == \
        "pip install torch==2.1.2+cpu --index-url /srv/wheels"
    # Set in their own line of webui-user.sh (above the block): theirs too.
    text = (tree / "webui-user.sh").read_text()
    (tree / "webui-user.sh").write_text(text.replace('#export TORCH_COMMAND="pip install torch==1.12.1+cu113',
                                                     'export TORCH_COMMAND="pip install torch==1.12.1+cu113'))
    assert _sourced(tree).startswith("pip install torch==1.12.1+cu113")
    # lowvram still knows its own block: applying again changes nothing, revert takes it out.
    before = (tree / "webui-user.sh").read_bytes()
    again = cli("apply", "--webui", str(tree), "--facts", str(no_gpu_facts), "--json")
    assert again.code == 0, again.err
    assert (tree / "webui-user.sh").read_bytes() == before
    assert cli("revert", "--webui", str(tree)).code == 0
    assert "TORCH_COMMAND:-" not in (tree / "webui-user.sh").read_text()


@pytest.mark.skipif(shutil.which("wine") is None, reason="wine is not installed (Debian package `wine`)")
@pytest.mark.wine
def test_the_bat_block_sets_torch_command_only_where_it_is_unset(tmp_path: Path) -> None:
    from lowvram.world.apply import apply_plan
    from tests.fixtures.git_repos import linux_facts, simple_plan
    from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT

    tree = make_webui(tmp_path / "w", webui_user_sh=None, webui_user_bat=STOCK_WEBUI_USER_BAT)
    apply_plan(simple_plan(args=("--use-cpu", "all"), env={"TORCH_COMMAND": A1111_CPU}), tree, linux_facts("windows"))
    (tree / "webui.bat").write_bytes(b'@echo off\r\necho %TORCH_COMMAND%> "%~dp0torch.txt"\r\n')

    def seen(extra: dict[str, str]) -> str:
        env = {**{k: v for k, v in os.environ.items() if k != "TORCH_COMMAND"}, "WINEDEBUG": "-all", **extra}
        subprocess.run(["wine", "cmd", "/c", "webui-user.bat"], cwd=tree, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False)
        return (tree / "torch.txt").read_bytes().decode("ascii", "replace").strip()

    assert b"if not defined TORCH_COMMAND set" in (tree / "webui-user.bat").read_bytes()
    assert seen({}) == A1111_CPU
    assert seen({"TORCH_COMMAND": "pip install mine"}) == "pip install mine"


# ---- §7 setup states the real download ----------------------------------------------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> UiMirror:
    return build_ui_mirror(tmp_path_factory.mktemp("ui-mirror") / "mirror")


@pytest.fixture
def with_mirror(mirror: UiMirror, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> UiMirror:
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror.root))
    pin_extensions(monkeypatch, mirror)
    bin_dir = tmp_path / "bin"  # a system Python 3.10 that answers at once (the venv's first start)
    bin_dir.mkdir()
    for name in ("python3.10", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\necho 3.10\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return mirror


def test_setup_without_an_nvidia_gpu_announces_the_cpu_download(cli: Any, with_mirror: UiMirror, no_gpu: None,
                                                                 tmp_path: Path) -> None:
    target = tmp_path / "sd" / "webui"
    res = cli("setup", "--ui", "a1111", "--dir", str(target))
    assert res.code == 0, res.err
    assert "torch 2.1.2+cpu and torchvision 0.16.2+cpu" in res.out and "190 MB" in res.out
    assert "cu121" not in res.out and "2.2 GB" not in res.out and "2.3 GB" not in res.out
    assert 'TORCH_COMMAND="${TORCH_COMMAND:-' + A1111_CPU + '}"' in (target / "webui-user.sh").read_text()
    data = json.loads(cli("setup", "--ui", "a1111", "--dir", str(target), "--json").out)  # adopted: same plan
    assert data["torch_build"] == "cpu"


def test_setup_with_an_nvidia_gpu_still_announces_the_cuda_download(cli: Any, with_mirror: UiMirror,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    from lowvram.world.detect import nvml
    from tests.fixtures.fake_nvml import gtx1070

    monkeypatch.setattr(nvml, "pynvml", gtx1070())
    target = tmp_path / "webui"
    data = json.loads(cli("setup", "--ui", "a1111", "--dir", str(target), "--json").out)
    whats = [d["what"] for d in data["first_start"]]
    assert any("2.1.2+cu121" in w for w in whats) and not any("+cpu" in w for w in whats)
    assert data["torch_build"] is None
    assert "TORCH_COMMAND:-" not in (target / "webui-user.sh").read_text()


def test_setup_of_comfyui_without_an_nvidia_gpu_gives_the_cpu_commands(cli: Any, with_mirror: UiMirror,
                                                                        no_gpu: None, tmp_path: Path) -> None:
    res = cli("setup", "--ui", "comfyui", "--dir", str(tmp_path / "ComfyUI"), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert any(f"--index-url {CPU_INDEX}" in cmd for cmd in data["before_launch"])
    assert not any("cu126" in cmd for cmd in data["before_launch"])
    assert [d["download_mb"] for d in data["first_start"] if "torch" in d["what"]] == [190]


# ---- §8 tune refuses at once where there is nothing to tune ------------------------------------


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiUi]:
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    ui = make_api_webui(tmp_path / "stable-diffusion-webui")
    yield ui
    ui.kill_all()


def _untouched(ui: ApiUi, before: bytes) -> None:
    assert ui.starts() == [], "tune started the UI"
    assert (ui.root / "webui-user.sh").read_bytes() == before
    assert not paths.hook_config_path(ui.root).exists()


def test_tune_without_an_nvidia_gpu_refuses_before_starting_anything(cli: Any, tree: ApiUi, no_gpu: None) -> None:
    before = (tree.root / "webui-user.sh").read_bytes()
    t0 = time.monotonic()
    res = cli("tune", "--webui", str(tree.root))
    assert time.monotonic() - t0 < 10
    assert res.code == 1
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "nothing to tune" in errors[0] and "no NVIDIA GPU" in errors[0]
    assert "NVIDIA driver not found" in errors[0]  # why there is none
    assert "hint:" in res.err and "lowvram launch" in res.err
    assert "Traceback" not in res.err and "before its API answered" not in res.err
    _untouched(tree, before)


def test_tune_on_another_gpu_or_from_gpu_less_facts_refuses_too(cli: Any, tree: ApiUi, tmp_path: Path) -> None:
    before = (tree.root / "webui-user.sh").read_bytes()
    amd = write_facts(MACHINES["amd-only"], tmp_path / "amd.json")
    res = cli("tune", "--webui", str(tree.root), "--facts", str(amd), "--json")
    assert res.code == 1
    error = json.loads(res.out)["error"]
    assert "nothing to tune" in error["message"] and "not NVIDIA" in error["message"] and "amd" in error["message"]
    none = write_facts(replace(MACHINES["no-gpu"]), tmp_path / "none.json")
    res = cli("tune", "--webui", str(tree.root), "--facts", str(none), "--json")
    assert res.code == 1 and "no NVIDIA GPU" in json.loads(res.out)["error"]["message"]
    _untouched(tree, before)


def test_the_resident_road_with_the_hook_off_is_refused_before_the_ui_starts(
        cli: Any, tree: ApiUi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = write_gtx1070_windows_facts(tmp_path / "gtx1070-windows.json")  # memory can spill: two roads
    monkeypatch.setenv("LOWVRAM_HOOK", "off")
    before = (tree.root / "webui-user.sh").read_bytes()
    res = cli("tune", "--webui", str(tree.root), "--facts", str(facts), "--roads", "resident", "--json")
    assert res.code == 1
    error = json.loads(res.out)["error"]
    assert "layout hook" in error["message"] and "LOWVRAM_HOOK=off" in error["message"]
    assert "--roads swap" in error["hint"]
    _untouched(tree, before)


def test_with_the_hook_off_auto_measures_only_the_swap_road(cli: Any, tree: ApiUi, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    facts = write_gtx1070_windows_facts(tmp_path / "gtx1070-windows.json")
    monkeypatch.setenv("LOWVRAM_HOOK", "off")
    res = cli("tune", "--webui", str(tree.root), "--facts", str(facts), "--steps", "2", "--repeats", "1")
    assert res.code == 0, res.err
    assert "only the swap road is measured" in res.err
    assert len(tree.starts()) == 1  # one start, for the swap road; none spent on probes that must fail
    assert {r["road"] for r in tree.requests()} == {"swap"}
    assert tree.alive() == []
