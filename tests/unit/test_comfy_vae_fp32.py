"""ComfyUI's --fp32-vae only where it changes something (issue 19: "every flag needs a reason that holds on
that UI"). ComfyUI picks the VAE's dtype itself (comfy/model_management.py vae_dtype): the first of the VAE's
working dtypes the card runs well, and the VAE of every family lowvram plans (comfy/sd.py's AutoencoderKL:
SD 1.x/2.x, SDXL, Flux.1, SD3) lists bf16 then fp32; should_use_bf16 is false on NVIDIA below sm 8.0, on
Windows and Linux alike. So on Pascal, Turing and GTX 16xx the VAE already runs in fp32 and the flag changes
nothing; on sm 8.0+ ComfyUI would run it in bf16, and the flag stays. The VAE decision stays "full" either
way (the estimate counts an fp32 VAE)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts


def _plan(cli: Any, tmp_path: Path, machine: str, family: str, *more: str, cc: str | None = "keep") -> dict[str, Any]:
    facts = with_webui(MACHINES[machine], "comfyui", family)
    if cc != "keep":
        facts = replace(facts, gpus=tuple(replace(g, compute_capability=cc) for g in facts.gpus))
    path = write_facts(facts, tmp_path / f"{machine}-{family}.json")
    result = cli("plan", "--json", "--facts", str(path), *more)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    assert data["ui"] == "comfyui"
    return data


def _vae(data: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in data["decisions"] if d["setting"] == "precision.vae")


@pytest.mark.parametrize(("machine", "family", "more"), [
    ("gtx1070-8gb", "sdxl", ()),  # Pascal, Linux: profile gtx1070-sdxl asks for an fp32 VAE
    ("gtx1660s-6gb-win", "sd15", ()),  # GTX 16xx, Windows: profile gtx16xx-sd15
    ("gtx1650-4gb", "sd15", ()),  # GTX 16xx, Linux: profile gtx1650-sd15
    ("gtx1050ti-4gb-win", "sdxl", ("--profile", "pascal-sdxl")),  # Pascal, Windows
    ("rtx2060-6gb", "sdxl", ("--profile", "pascal-sdxl")),  # Turing (sm 7.5): no bf16 either
])
def test_no_fp32_vae_where_comfyui_already_runs_the_vae_in_fp32(cli: Any, tmp_path: Path, machine: str, family: str,
                                                                more: tuple[str, ...]) -> None:
    data = _plan(cli, tmp_path, machine, family, *more)
    assert "--fp32-vae" not in data["args"]
    vae = _vae(data)
    assert vae["value"] == "full"  # the estimate still counts an fp32 VAE
    assert "ComfyUI does by itself" in vae["reason"] and "no --fp32-vae" in vae["reason"]


def test_fp32_vae_stays_where_comfyui_would_run_the_vae_in_bf16(cli: Any, tmp_path: Path) -> None:
    data = _plan(cli, tmp_path, "rtx3060-12gb", "sdxl", "--profile", "gtx1070-sdxl")  # sm 8.6: bf16 by default
    assert "--fp32-vae" in data["args"]
    vae = _vae(data)
    assert vae["value"] == "full" and "by itself" not in vae["reason"]


def test_fp32_vae_stays_on_a_card_of_unknown_compute_capability(cli: Any, tmp_path: Path) -> None:
    data = _plan(cli, tmp_path, "gtx1070-8gb", "sdxl", "--profile", "gtx1070-sdxl", cc=None)
    assert "--fp32-vae" in data["args"]


def test_forge_neo_keeps_leaving_its_fp32_vae_out_on_pascal(cli: Any, tmp_path: Path) -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "forge", "sdxl")
    assert facts.webui is not None
    facts = replace(facts, webui=replace(facts.webui, flavor="forge-neo", version=None))
    result = cli("plan", "--json", "--facts", str(write_facts(facts, tmp_path / "neo.json")))
    assert result.code == 0, result.err
    assert "--fp32-vae" not in json.loads(result.out)["args"]
