"""`lowvram doctor` end to end: human output, --json, exit codes, errors, speed-relevant imports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lowvram.world.detect import nvml
from tests.conftest import run_lowvram
from tests.fixtures import fake_nvml
from tests.fixtures.webui_trees import make_webui


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def install(scenario: str) -> None:
        monkeypatch.setattr(nvml, "pynvml", fake_nvml.SCENARIOS[scenario]())

    return install


@pytest.fixture(autouse=True)
def _away_from_webuis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def test_no_gpu_prints_a_sensible_report_and_exits_1(cli, gpu) -> None:
    gpu("no_driver")
    result = cli("doctor")
    assert result.code == 1
    assert "GPU     none (NVIDIA driver not found (NVML library missing))" in result.out
    assert "fail  gpu.nvidia" in result.out
    assert "→ install the NVIDIA driver" in result.out
    assert "1 failed" in result.out
    assert "Traceback" not in result.out + result.err


@pytest.mark.parametrize("scenario", sorted(fake_nvml.SCENARIOS))
def test_json_for_every_scenario_follows_the_contract(cli, gpu, scenario: str) -> None:
    gpu(scenario)
    result = cli("doctor", "--json")
    data = json.loads(result.out)
    assert list(data)[:1] == ["schema"] and data["schema"] == 1
    assert {"system", "gpus", "other_gpus", "tcmalloc", "webui", "checks"} <= set(data)
    failed = any(c["status"] == "fail" for c in data["checks"])
    assert result.code == (1 if failed else 0)
    assert (scenario in ("no_driver", "driver_not_loaded")) == (data["gpus"] == [])
    if data["gpus"]:
        assert {"index", "uuid", "name", "vram_total_mb", "vram_free_mb", "driver", "cuda_driver",
                "compute_capability", "pcie_gen", "pcie_width"} <= set(data["gpus"][0])


@pytest.mark.parametrize(("scenario", "expect"), [
    ("gtx1050ti", ["NVIDIA GeForce GTX 1050 Ti", "4 GB class", "Pascal"]),
    ("gtx1070", ["NVIDIA GeForce GTX 1070", "8 GB class", "Pascal"]),
    ("gtx1660", ["NVIDIA GeForce GTX 1660", "6 GB class", "--upcast-sampling"]),
    ("rtx3060", ["NVIDIA GeForce RTX 3060", "10–12 GB class", "no known quirk"]),
    ("two_gpus", ["largest of 2 NVIDIA GPUs", "RTX 3060"]),
    ("memory_not_supported", ["VRAM size unknown"]),
    ("lost_gpu", ["lost"]),
    ("function_not_found", ["driver 470.256.02"]),
])
def test_human_output_per_scenario(cli, gpu, scenario: str, expect: list[str]) -> None:
    gpu(scenario)
    result = cli("doctor")
    for text in expect:
        assert text in result.out, text
    assert result.code in (0, 1)


def test_webui_a1111_tree_names_flavor_version_torch_and_family(cli, gpu, tmp_path: Path) -> None:
    gpu("gtx1070")
    root = make_webui(tmp_path / "stable-diffusion-webui", version="1.8.0")
    result = cli("doctor", "--webui", str(root))
    assert result.code == 0, result.out + result.err
    assert "a1111, 1.8.0" in result.out
    assert "AUTOMATIC1111 1.8.0" in result.out
    assert "torch 2.1.2+cu121" in result.out
    assert "sd_xl_base_1.0.safetensors: SDXL" in result.out
    data = json.loads(cli("doctor", "--webui", str(root), "--json").out)
    w = data["webui"]
    assert (w["flavor"], w["version"], w["torch"], w["torch_cuda"], w["model_family"]) == \
        ("a1111", "1.8.0", "2.1.2+cu121", "12.1", "sdxl")
    assert w["xformers"] == "0.0.23.post1" and w["batch_cond_uncond"] is True
    assert w["checkpoint"] == "sd_xl_base_1.0.safetensors"


def test_webui_found_from_the_current_directory(cli, gpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu("rtx3060")
    root = make_webui(tmp_path / "forge", flavor="forge", family="sd15", checkpoint="v1-5.safetensors")
    monkeypatch.chdir(root)
    data = json.loads(cli("doctor", "--json").out)
    assert data["webui"]["flavor"] == "forge" and data["webui"]["model_family"] == "sd15"


def test_not_a_webui_is_one_line_and_exit_1(cli, gpu, tmp_path: Path) -> None:
    gpu("gtx1070")
    result = cli("doctor", "--webui", str(tmp_path))
    assert result.code == 1
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert lines[0] == f"error: {tmp_path} is not a Stable Diffusion WebUI"
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in result.err
    as_json = cli("doctor", "--webui", str(tmp_path), "--json")
    assert json.loads(as_json.out)["error"]["message"].endswith("is not a Stable Diffusion WebUI")


def test_bad_config_json_is_one_warning(cli, gpu, tmp_path: Path) -> None:
    gpu("gtx1070")
    root = make_webui(tmp_path / "sd")
    (root / "config.json").write_text("{broken")
    result = cli("doctor", "--webui", str(root))
    assert result.code == 0
    line = next(x for x in result.out.splitlines() if "webui.found" in x)
    assert line.startswith("warn") and f"{root / 'config.json'} is not valid JSON" in line
    assert "Traceback" not in result.err


def test_truncated_checkpoint_is_one_warning(cli, gpu, tmp_path: Path) -> None:
    gpu("gtx1070")
    root = make_webui(tmp_path / "sd")
    ckpt = root / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:20])
    result = cli("doctor", "--webui", str(root))
    assert result.code == 0
    line = next(x for x in result.out.splitlines() if "webui.checkpoint" in x)
    assert line.startswith("warn") and f"{ckpt} is truncated" in line
    assert "--model" in result.out and "Traceback" not in result.err


def test_facts_file_instead_of_probing(cli, gpu, tmp_path: Path) -> None:
    gpu("gtx1660")
    saved = tmp_path / "facts.json"
    saved.write_text(cli("doctor", "--json").out)
    gpu("no_driver")
    result = cli("doctor", "--facts", str(saved))
    assert "NVIDIA GeForce GTX 1660" in result.out
    root = make_webui(tmp_path / "sd", family="sd15", checkpoint="a.safetensors")
    data = json.loads(cli("doctor", "--facts", str(saved), "--webui", str(root), "--json").out)
    assert data["gpus"][0]["name"] == "NVIDIA GeForce GTX 1660" and data["webui"]["model_family"] == "sd15"


def test_bad_facts_file(cli, tmp_path: Path) -> None:
    bad = tmp_path / "f.json"
    bad.write_text("{nope")
    result = cli("doctor", "--facts", str(bad))
    assert result.code == 1 and "is not valid JSON" in result.err


def test_doctor_writes_no_state(cli, gpu, tmp_path: Path, lowvram_home: Path) -> None:
    gpu("gtx1070")
    cli("doctor", "--webui", str(make_webui(tmp_path / "sd")))
    assert list(lowvram_home.iterdir()) == []


def test_help_has_an_example(cli) -> None:
    result = cli("doctor", "--help")
    assert result.code == 0 and "lowvram doctor --webui" in result.out


def test_real_subprocess_does_not_import_torch_or_git() -> None:
    code = ("import sys; from lowvram.cli import main; rc = main(['doctor', '--json']); "
            "sys.stdout.write('\\nIMPORTED ' + ' '.join(m for m in ('torch', 'git', 'rich') if m in sys.modules) + '\\n'); "
            "sys.exit(rc)")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    imported = proc.stdout.rsplit("IMPORTED", 1)[1].split()
    assert imported == []
    assert "Traceback" not in proc.stderr


def test_python_dash_m_doctor_on_this_machine() -> None:
    proc = run_lowvram("doctor")
    assert proc.returncode in (0, 1)
    assert "gpu.nvidia" in proc.stdout and "Traceback" not in proc.stderr
    data = json.loads(run_lowvram("doctor", "--json").stdout)
    assert data["schema"] == 1
    assert proc.returncode == (1 if any(c["status"] == "fail" for c in data["checks"]) else 0)


def test_debug_lists_the_nvml_fields_that_failed(cli, gpu) -> None:
    gpu("function_not_found")
    plain = cli("doctor")
    assert "pcie_gen: FunctionNotFound" not in plain.out
    debug = cli("--debug", "doctor")
    assert "NVML GPU 0: pcie_gen: FunctionNotFound" in debug.out
