"""resolve_webui's order and gather_facts from probing or from a facts file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.core.errors import FactsError, WebuiError
from lowvram.core.facts import facts_from_dict
from lowvram.world import state
from lowvram.world.detect import gather_facts, nvml, resolve_webui
from tests.fixtures import fake_nvml
from tests.fixtures.webui_trees import make_webui


def test_explicit_path_must_be_a_webui(tmp_path: Path) -> None:
    with pytest.raises(WebuiError, match="is not a Stable Diffusion WebUI"):
        resolve_webui(tmp_path)
    root = make_webui(tmp_path / "sd")
    assert resolve_webui(root) == root.resolve()


def test_order_env_then_cwd_then_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_webui(tmp_path / "a")
    b = make_webui(tmp_path / "b", flavor="forge")
    c = make_webui(tmp_path / "c", flavor="comfyui")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_webui(None) is None
    state.remember(c)
    assert resolve_webui(None) == c.resolve()
    monkeypatch.chdir(b)
    assert resolve_webui(None) == b.resolve()
    monkeypatch.setenv("LOWVRAM_WEBUI", str(a))
    assert resolve_webui(None) == a.resolve()
    assert resolve_webui(c) == c.resolve()  # the argument beats everything


def test_env_that_is_not_a_webui_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWVRAM_WEBUI", str(tmp_path / "nope"))
    with pytest.raises(WebuiError, match=r"^LOWVRAM_WEBUI: .*does not exist"):
        resolve_webui(None)


def test_remembered_path_that_is_gone_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_webui(tmp_path / "sd")
    state.remember(root)
    (root / "webui.sh").unlink()
    (root / "webui.bat").unlink()
    monkeypatch.chdir(tmp_path)
    assert resolve_webui(None) is None


def test_gather_probes_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.gtx1070())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    root = make_webui(tmp_path / "sd")
    facts = gather_facts(root)
    assert facts.gpus[0].name == "NVIDIA GeForce GTX 1070"
    assert facts.nvml_error is None
    assert facts.webui is not None and facts.webui.model_family == "sdxl"
    assert facts.cuda.visible_devices == "0"
    assert facts.system.ram_mb


def test_gather_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.no_driver())
    facts = gather_facts()
    assert facts.gpus == () and facts.nvml_error is not None and facts.webui is None


def test_facts_file_round_trip_with_webui_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.rtx3060())
    probed = gather_facts()
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"schema": 1, **probed.to_dict()}))
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.no_driver())  # a file must not probe
    again = gather_facts(facts_file=path)
    assert again.gpus == probed.gpus and again.system == probed.system
    root = make_webui(tmp_path / "sd", webui_user_bat="set COMMANDLINE_ARGS=--lowvram\r\ncall webui.bat\r\n")
    windows = dict(probed.to_dict(), system={**probed.to_dict()["system"], "os": "windows"})
    path.write_text(json.dumps(windows))
    with_tree = gather_facts(root, facts_file=path)
    assert with_tree.webui is not None and with_tree.webui.user_args == ("--lowvram",)  # the file's OS picks .bat


def test_facts_from_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"system": {"os": "linux"}, "gpus": [{"name": "X", "vram_total_mb": 6144}]}))
    monkeypatch.setenv("LOWVRAM_FACTS", str(path))
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.no_driver())
    assert gather_facts().gpus[0].vram_total_mb == 6144
    monkeypatch.setenv("LOWVRAM_FACTS", str(tmp_path / "missing.json"))
    with pytest.raises(FactsError):
        gather_facts()


def test_facts_dict_is_what_doctor_json_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.two_gpus())
    facts = gather_facts()
    assert facts_from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
