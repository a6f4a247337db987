"""Forge Neo's --fast-fp8 in the plan (issue 19 item 4): with it Neo runs the Linear layers of an fp8_e4m3fn
model as fp8 matmuls (backend/operations.py: ForgeOperationsFP8 where the storage dtype is float8_e4m3fn,
args.fast_fp8 and supports_fp8_compute(), i.e. sm 8.9+), and ignores it anywhere else. The plan sets it exactly
there, says why it is left out where a user might expect it, and the step time then counts no fp8 cast."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.core.estimate import memory as est
from lowvram.core.estimate.format_choice import card_speed, step_seconds
from lowvram.core.estimate.formats import FORMATS
from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts

FLUX = "flux1-dev"


def _plan(cli: Any, tmp_path: Path, machine: str, *, flavor: str = "forge-neo", fmt: str | None = "fp8_e4m3fn",
          family: str = FLUX) -> dict[str, Any]:
    facts = with_webui(MACHINES[machine], "forge", family)
    assert facts.webui is not None
    facts = replace(facts, webui=replace(facts.webui, flavor=flavor, version=None, model_format=fmt))
    path = write_facts(facts, tmp_path / f"{machine}-{flavor}-{fmt}.json")
    result = cli("plan", "--json", "--facts", str(path))
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    assert data["ui"] == flavor
    return data


def _decision(data: dict[str, Any], setting: str) -> dict[str, Any] | None:
    return next((d for d in data["decisions"] if d["setting"] == setting), None)


@pytest.mark.parametrize("machine", ["rtx4060ti-16gb", "rtx4060-8gb-win", "rtx4090-24gb"])
def test_neo_gets_fast_fp8_for_an_e4m3fn_file_on_ada(cli: Any, tmp_path: Path, machine: str) -> None:
    data = _plan(cli, tmp_path, machine)
    assert "--fast-fp8" in data["args"]
    d = _decision(data, "fast_fp8")
    assert d is not None and d["value"] is True
    assert "torch._scaled_mm" in d["reason"] and "no fp8 cast" in d["reason"]


@pytest.mark.parametrize(("machine", "sm"), [("rtx3060-12gb", "8.6"), ("rtx2060-6gb", "7.5"), ("gtx1070-8gb", "6.1")])
def test_no_fast_fp8_below_sm_8_9_and_the_plan_says_why(cli: Any, tmp_path: Path, machine: str, sm: str) -> None:
    data = _plan(cli, tmp_path, machine)
    assert "--fast-fp8" not in data["args"]
    d = _decision(data, "fast_fp8")
    assert d is not None and d["value"] is False
    assert f"sm {sm}" in d["reason"] and "8.9" in d["reason"]


def test_no_fast_fp8_for_an_e5m2_file_neo_cannot_multiply(cli: Any, tmp_path: Path) -> None:
    data = _plan(cli, tmp_path, "rtx4060ti-16gb", fmt="fp8_e5m2")
    assert "--fast-fp8" not in data["args"]
    d = _decision(data, "fast_fp8")
    assert d is not None and d["value"] is False and "fp8_e4m3fn weights only" in d["reason"]


@pytest.mark.parametrize("fmt", [None, "bf16", "q8_0"])
def test_no_fast_fp8_and_no_word_of_it_for_other_formats(cli: Any, tmp_path: Path, fmt: str | None) -> None:
    data = _plan(cli, tmp_path, "rtx4060ti-16gb", fmt=fmt)
    assert "--fast-fp8" not in data["args"] and _decision(data, "fast_fp8") is None


@pytest.mark.parametrize("flavor", ["forge", "reforge"])
def test_only_neo_has_fast_fp8(cli: Any, tmp_path: Path, flavor: str) -> None:
    data = _plan(cli, tmp_path, "rtx4060ti-16gb", flavor=flavor)
    assert "--fast-fp8" not in data["args"] and _decision(data, "fast_fp8") is None


def test_fast_fp8_is_checked_against_neos_own_list(cli: Any, tmp_path: Path) -> None:
    data = _plan(cli, tmp_path, "rtx4060ti-16gb")
    assert "--fast-fp8" in data["args"]
    assert data["extra"]["flags_checked_against"] == "Forge Neo"  # ui/flags/forge-neo.txt has --fast-fp8
    from lowvram.ui import adapter

    adapter("forge-neo").validate(list(data["args"]), None)


def test_the_step_time_counts_no_fp8_cast_with_fast_fp8() -> None:
    req = est.EstimateRequest(FLUX, 1024, 1024, 1)
    speed = card_speed(cc=(8, 9), name="NVIDIA GeForce RTX 4060 Ti", cores=4352, clock_mhz=2535, pcie_gen=4,
                       pcie_width=8)
    cast = step_seconds(req, "fp8_e4m3fn", speed, 0.0)
    fast = step_seconds(req, "fp8_e4m3fn", speed, 0.0, fast_fp8=True)
    bf16 = step_seconds(req, "bf16", speed, 0.0)
    assert cast == pytest.approx(bf16 * (1 + FORMATS["fp8_e4m3fn"].dequant))
    assert fast == pytest.approx(bf16)  # no per-layer cast; still counted at the 16-bit rate
    assert step_seconds(req, "q8_0", speed, 0.0, fast_fp8=True) == step_seconds(req, "q8_0", speed, 0.0)


def test_the_streaming_ratio_on_neo_counts_the_fp8_matmul(cli: Any, tmp_path: Path) -> None:
    # Flux-dev fp8 streams on an 8 GB Ada card: with --fast-fp8 the step's compute is shorter (no cast), so the
    # same bytes streamed weigh more in the step time than with the e5m2 file Neo casts layer by layer.
    def ratio(fmt: str) -> float:
        d = _decision(_plan(cli, tmp_path, "rtx4060-8gb-win", fmt=fmt), "streaming")
        assert d is not None and d["value"], d
        found = re.search(r"~(\d+\.\d)× the step time", d["reason"])
        assert found, d["reason"]
        return float(found.group(1))

    assert ratio("fp8_e4m3fn") > ratio("fp8_e5m2")
