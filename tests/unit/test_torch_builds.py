"""Issue 17 §6: Pascal and the new torch builds.

PyTorch's CUDA 12.8+ wheels (from torch 2.8) and every CUDA 13 wheel have no kernels for sm_50–61
(GTX 9xx/10xx); the CUDA 12.6 wheels do, up to torch 2.14 (reference/vram_data.md §9). doctor reads
the venv's torch build and fails with the pip command that fixes it; the plan and `setup` pin a
CUDA 12.6 build where the UI would install one the card cannot run (SD.Next: 2.12.0+cu130).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts
from tests.fixtures.ui_repos import UiMirror, build_ui_mirror, pin_extensions
from tests.fixtures.webui_trees import make_webui

CU126 = "--index-url https://download.pytorch.org/whl/cu126"
SDNEXT_PIN = f"torch==2.12.0+cu126 torchvision==0.27.0+cu126 {CU126}"
# torch/version.py as a torch 2.11 CUDA 13.0 wheel writes it (annotated assignments).
VERSION_PY = ("from typing import Optional\n\n__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip']\n"
              "__version__ = '{torch}'\ndebug = False\ncuda: Optional[str] = '{cuda}'\n"
              "git_version = '0000000000000000000000000000000000000000'\nhip: Optional[str] = None\n")


@pytest.fixture(autouse=True)
def _nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


def _facts(tmp_path: Path, machine: str, name: str = "facts.json") -> Path:
    return write_facts(MACHINES[machine], tmp_path / name)


def _tree(tmp_path: Path, flavor: str, torch: str | None, cuda: str | None = None) -> Path:
    tree = make_webui(tmp_path / flavor, flavor=flavor, version=None if flavor != "a1111" else "1.10.1",
                      torch=torch, xformers=None)
    if torch and cuda:
        (version_py,) = tree.glob("venv/lib/python*/site-packages/torch/version.py")
        version_py.write_text(VERSION_PY.format(torch=torch, cuda=cuda))
    return tree


def _check(data: dict[str, Any], check_id: str) -> dict[str, Any]:
    return next(c for c in data["checks"] if c["id"] == check_id)


def _decision(plan: dict[str, Any], setting: str) -> dict[str, Any] | None:
    return next((d for d in plan["decisions"] if d["setting"] == setting), None)


# ---- doctor ----------------------------------------------------------------------------------


def test_doctor_fails_a_cu130_torch_on_a_gtx_1070_with_the_exact_fix(cli: Any, tmp_path: Path) -> None:
    tree = _tree(tmp_path, "forge", "2.11.0+cu130", "13.0")  # what Forge Neo installs
    facts = _facts(tmp_path, "gtx1070-8gb")
    res = cli("doctor", "--webui", str(tree), "--facts", str(facts))
    assert res.code == 1, res.out
    assert "fail  webui.torch_driver" in res.out
    assert "torch 2.11.0+cu130 has no kernels for the GTX 1070 (sm_61)" in res.out
    python = tree.resolve() / "venv" / "bin" / "python"
    fix = f"{python} -m pip install torch==2.11.0+cu126 torchvision==0.26.0+cu126 {CU126}"
    assert fix in res.out
    data = json.loads(cli("doctor", "--webui", str(tree), "--facts", str(facts), "--json").out)
    assert data["webui"]["torch"] == "2.11.0+cu130" and data["webui"]["torch_cuda"] == "13.0"  # detection
    check = _check(data, "webui.torch_driver")
    assert check["status"] == "fail" and fix in check["hint"] and "CUDA 13.0" in check["message"]


def test_doctor_passes_the_cu121_torch_a1111_installs_on_the_same_card(cli: Any, tmp_path: Path) -> None:
    tree = _tree(tmp_path, "a1111", "2.1.2+cu121", "12.1")
    res = cli("doctor", "--webui", str(tree), "--facts", str(_facts(tmp_path, "gtx1070-8gb")), "--json")
    assert res.code == 0, res.out
    check = _check(json.loads(res.out), "webui.torch_driver")
    assert check["status"] == "ok" and "no kernels" not in check["message"]


@pytest.mark.parametrize(("machine", "torch", "cuda", "status"), [
    ("gtx1070-8gb", "2.8.0", "12.8", "fail"),  # PyPI's Linux wheel: no local version, CUDA from version.py
    ("gtx1070-8gb", "2.7.0+cu128", "12.8", "ok"),  # torch 2.7's cu128 wheels still had sm_50/60
    ("gtx1060-6gb", "2.9.1+cu129", "12.9", "fail"),
    ("gtx1070-8gb", "2.9.0+cu126", "12.6", "ok"),
    ("rtx3060-12gb", "2.11.0+cu130", "13.0", "ok"),
    ("gtx1650-4gb", "2.12.0+cu130", "13.0", "ok"),  # Turing sm_75: the CUDA 13 floor itself
])
def test_doctor_reads_which_builds_run_on_which_card(cli: Any, tmp_path: Path, machine: str, torch: str,
                                                     cuda: str, status: str) -> None:
    facts = with_webui(MACHINES[machine], "sdnext", "sdxl", torch=torch)
    assert facts.webui is not None
    facts = replace(facts, webui=replace(facts.webui, torch_cuda=cuda))
    res = cli("doctor", "--facts", str(write_facts(facts, tmp_path / "f.json")), "--json")
    check = _check(json.loads(res.out), "webui.torch_driver")
    if status == "fail":
        assert check["status"] == "fail" and "no kernels" in check["message"], check
        assert res.code == 1 and "+cu126" in check["hint"]
    else:  # it runs on the card (the driver may still be too old for CUDA 13: another finding)
        assert "no kernels" not in check["message"], check


def test_a_torch_newer_than_the_last_cu126_release_is_pointed_at_2_14(cli: Any, tmp_path: Path) -> None:
    facts = with_webui(MACHINES["gtx1050ti-4gb-win"], "a1111", "sd15", torch="2.15.0+cu130",
                       path="C:\\Users\\me\\sd webui")
    assert facts.webui is not None
    facts = replace(facts, webui=replace(facts.webui, python="C:\\Users\\me\\sd webui\\venv\\Scripts\\python.exe"))
    res = cli("doctor", "--facts", str(write_facts(facts, tmp_path / "f.json")), "--json")
    check = _check(json.loads(res.out), "webui.torch_driver")
    assert check["status"] == "fail"
    assert ('`"C:\\Users\\me\\sd webui\\venv\\Scripts\\python.exe" -m pip install torch==2.14.0+cu126 '
            f"torchvision==0.29.0+cu126 {CU126}`") in check["hint"]
    assert "last release with CUDA 12.6 wheels" in check["hint"]


# ---- the plan ---------------------------------------------------------------------------------


def _plan(cli: Any, *args: str) -> dict[str, Any]:
    res = cli("plan", "--json", *args)
    assert res.code == 0, res.err
    return dict(json.loads(res.out))


def test_the_plan_pins_a_cu126_torch_for_sdnext_on_a_gtx_1070(cli: Any, tmp_path: Path) -> None:
    """SD.Next's first start installs 2.12.0+cu130, which has no kernels for sm_61 (Forge Neo is no
    flavor of lowvram's: a Neo tree reads as Forge, so doctor's venv check is what covers it)."""
    plan = _plan(cli, "--facts", str(_facts(tmp_path, "gtx1070-8gb")), "--ui", "sdnext", "--model", "sdxl")
    assert plan["env"]["TORCH_COMMAND"] == SDNEXT_PIN
    decision = _decision(plan, "torch_install")
    assert decision is not None and decision["value"] == "cu126" and decision["source"] == "auto"
    assert "GTX 1070 (sm_61)" in decision["reason"] and "2.12.0+cu130" in decision["reason"]
    assert "TORCH_COMMAND of yours wins" in decision["reason"]


@pytest.mark.parametrize(("machine", "ui"), [("gtx1070-8gb", "a1111"), ("gtx1070-8gb", "forge"),
                                             ("rtx3060-12gb", "sdnext"), ("gtx1650-4gb", "sdnext")])
def test_no_pin_where_the_uis_own_torch_runs_on_the_card(cli: Any, tmp_path: Path, machine: str, ui: str) -> None:
    plan = _plan(cli, "--facts", str(_facts(tmp_path, machine)), "--ui", ui, "--model", "sd15")
    assert "TORCH_COMMAND" not in plan["env"]
    assert _decision(plan, "torch_install") is None


def test_the_plan_says_how_to_replace_a_venv_torch_the_card_cannot_run(cli: Any, tmp_path: Path) -> None:
    tree = _tree(tmp_path, "forge", "2.11.0+cu130", "13.0")
    plan = _plan(cli, "--webui", str(tree), "--facts", str(_facts(tmp_path, "gtx1070-8gb")))
    assert "TORCH_COMMAND" not in plan["env"]  # Forge installs torch only when it is missing
    decision = _decision(plan, "torch_install")
    assert decision is not None and decision["value"] is None
    fix = f"-m pip install torch==2.11.0+cu126 torchvision==0.26.0+cu126 {CU126}"
    assert fix in decision["reason"]
    assert any(fix in w for w in plan["warnings"])


def test_apply_writes_the_pin_into_sdnexts_webui_user(cli: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mirror").mkdir()  # the profile's extensions fail at once, offline; the block is written
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    tree = _tree(tmp_path, "sdnext", None)
    res = cli("apply", "--webui", str(tree), "--facts", str(_facts(tmp_path, "gtx1070-8gb")))
    assert res.code in (0, 1) and "Traceback" not in res.err, res.err
    assert 'TORCH_COMMAND="${TORCH_COMMAND:-' + SDNEXT_PIN + '}"' in (tree / "webui-user.sh").read_text()


# ---- setup ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> UiMirror:
    return build_ui_mirror(tmp_path_factory.mktemp("ui-mirror") / "mirror")


@pytest.fixture
def with_mirror(mirror: UiMirror, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> UiMirror:
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror.root))
    pin_extensions(monkeypatch, mirror)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3.10", "python3.12", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\necho 3.12\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return mirror


def test_setup_of_sdnext_on_a_gtx_1070_states_the_cu126_download(cli: Any, with_mirror: UiMirror,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from lowvram.world.detect import nvml
    from tests.fixtures.fake_nvml import gtx1070

    monkeypatch.setattr(nvml, "pynvml", gtx1070())
    target = tmp_path / "sdnext"
    res = cli("setup", "--ui", "sdnext", "--dir", str(target), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["torch_build"] == "cu126"
    whats = [d["what"] for d in data["first_start"] if "torch" in d["what"]]
    assert len(whats) == 1 and "2.12.0+cu126" in whats[0] and "cu130" not in whats[0]
    assert 'TORCH_COMMAND="${TORCH_COMMAND:-' + SDNEXT_PIN + '}"' in (target / "webui-user.sh").read_text()
    text = cli("setup", "--ui", "sdnext", "--dir", str(target))  # adopted: the human screen says the same
    assert text.code == 0, text.err
    assert "torch 2.12.0+cu126" in text.out
