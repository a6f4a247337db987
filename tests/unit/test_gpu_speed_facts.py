"""The GPU's speed facts (issue 18's partial-offload cost): doctor --json carries CUDA cores, the SM
clock's maximum and the link's maximum; doctor's GPU line shows the maximum link, not an idle Gen 1;
a facts file reads them back (and an older one without them still reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.world.detect import nvml
from tests.fixtures import fake_nvml
from tests.fixtures.faults import GTX1070_LINUX


@pytest.fixture(autouse=True)
def _away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("LOWVRAM_WEBUI", raising=False)
    monkeypatch.delenv("LOWVRAM_FACTS", raising=False)


def test_doctor_shows_the_links_maximum_for_an_idle_card(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.idle_link())
    result = cli("doctor")
    assert "PCIe 4 x16" in result.out and "PCIe 1 x16" not in result.out
    gpu = json.loads(cli("doctor", "--json").out)["gpus"][0]
    assert (gpu["pcie_gen"], gpu["pcie_width"]) == (1, 16)  # the current link: kept, as it was
    assert (gpu["cuda_cores"], gpu["sm_clock_max_mhz"], gpu["pcie_gen_max"], gpu["pcie_width_max"]) == \
        (3584, 2100, 4, 16)


def test_speed_facts_not_supported_are_null(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.speed_not_supported())
    gpu = json.loads(cli("doctor", "--json").out)["gpus"][0]
    assert gpu["cuda_cores"] is None and gpu["sm_clock_max_mhz"] is None
    assert "cuda_cores: NotSupported" in gpu["errors"]


def test_a_facts_file_reads_them_back(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "facts.json"
    data = json.loads(json.dumps(GTX1070_LINUX))
    data["gpus"][0].update(pcie_gen=1)
    path.write_text(json.dumps(data), encoding="utf-8")
    result = cli("doctor", "--facts", str(path))
    assert "PCIe 3 x16" in result.out
    gpu = json.loads(cli("doctor", "--facts", str(path), "--json").out)["gpus"][0]
    assert (gpu["cuda_cores"], gpu["sm_clock_max_mhz"], gpu["pcie_gen_max"]) == (1920, 1911, 3)
    for key in ("cuda_cores", "sm_clock_max_mhz", "pcie_gen_max", "pcie_width_max"):
        del data["gpus"][0][key]
    path.write_text(json.dumps(data), encoding="utf-8")
    old = cli("doctor", "--facts", str(path), "--json")
    gpu = json.loads(old.out)["gpus"][0]
    assert gpu["cuda_cores"] is None and gpu["pcie_gen"] == 1
    assert "PCIe 1 x16" in cli("doctor", "--facts", str(path)).out  # no maximum known: the current link


def test_a_speed_fact_of_the_wrong_type_is_one_facts_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(json.dumps(GTX1070_LINUX))
    data["gpus"][0]["cuda_cores"] = "many"
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    result = cli("doctor", "--facts", str(path))
    assert result.code == 1 and "cuda_cores" in result.err and "Traceback" not in result.err
