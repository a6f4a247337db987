"""Every flag lowvram plans for the Forge lineage must change something on that UI (issue 19).

What Forge does by itself (backend/memory_management.py of the real Forge):
- VAE_DTYPES starts as [float32] and gains bfloat16 first only on sm 8.0+ with bf16 support, so below
  sm 8.0 the VAE already runs in fp32: `--vae-in-fp32` (Neo: `--fp32-vae`) changes nothing there.
- With torch >= 2 it turns PyTorch attention on by itself unless a working xformers imports
  (XFORMERS_IS_AVAILABLE), and `--attention-pytorch` alone sets XFORMERS_IS_AVAILABLE False: where no
  working xformers is in the venv, `--disable-xformers --attention-pytorch` changes nothing.
Each case runs the real CLI (`plan --json`) on a fixture tree with a facts file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import paths
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_forge_lineage, make_webui

VAE_FLAGS = ("--vae-in-fp32", "--fp32-vae")
SDP_FLAGS = ("--attention-pytorch", "--disable-xformers", "--use-pytorch-cross-attention")


def _tree(tmp_path: Path, kind: str, family: str, **kwargs: Any) -> Path:
    root = tmp_path / kind
    if kind == "forge":
        return make_webui(root, flavor="forge", version="f2.0.1v1.10.1-previous-1-g1", family=family, **kwargs)
    return make_forge_lineage(root, kind, family=family, **kwargs)


def _plan(cli: Any, tmp_path: Path, machine: str, tree: Path, *extra: str) -> dict[str, Any]:
    facts = write_facts(MACHINES[machine], tmp_path / f"{machine}.json")
    res = cli("plan", "--facts", str(facts), "--webui", str(tree), "--json", *extra)
    assert res.code == 0, res.err
    data: dict[str, Any] = json.loads(res.out)
    return data


def _decision(data: dict[str, Any], setting: str) -> dict[str, Any]:
    return next(d for d in data["decisions"] if d["setting"] == setting)


@pytest.mark.parametrize("kind", ["forge", "forge-neo", "reforge"])
@pytest.mark.parametrize("machine", ["gtx1650-4gb", "gtx1660s-6gb-win"])
def test_no_fp32_vae_flag_where_the_forge_lineage_already_runs_the_vae_in_fp32(cli, tmp_path: Path, kind: str,
                                                                               machine: str) -> None:
    """GTX 16xx profiles ask for an fp32 VAE; on sm 7.5 the Forge lineage runs it in fp32 by itself."""
    data = _plan(cli, tmp_path, machine, _tree(tmp_path, kind, "sd15"))
    assert not set(VAE_FLAGS) & set(data["args"]), data["args"]
    vae = _decision(data, "precision.vae")
    assert vae["value"] == "full"  # the estimate still counts an fp32 VAE: that is what runs
    assert "by itself" in vae["reason"] and "no flag" in vae["reason"]


def test_fp32_vae_flag_kept_where_forge_would_run_the_vae_in_bf16(cli, tmp_path: Path) -> None:
    """On sm 8.6 Forge picks bf16 for the VAE: a profile's fp32 VAE is a change, so the flag stays."""
    data = _plan(cli, tmp_path, "rtx3060-12gb", _tree(tmp_path, "forge", "sd15"), "-p", "gtx1650-sd15")
    assert "--vae-in-fp32" in data["args"]
    assert "no flag" not in _decision(data, "precision.vae")["reason"]


@pytest.mark.parametrize("kind", ["forge-neo", "reforge"])
def test_no_pytorch_attention_flags_on_pascal_without_a_working_xformers(cli, tmp_path: Path, kind: str) -> None:
    """The profile wants xformers, this UI installs none lowvram can match: SDP, which the UI picks by itself."""
    data = _plan(cli, tmp_path, "gtx1070-8gb", _tree(tmp_path, kind, "sdxl", xformers=None))
    assert not set(SDP_FLAGS) & set(data["args"]), data["args"]
    attention = _decision(data, "attention")
    assert attention["value"] == "auto" and "by itself" in attention["reason"] and "no flag" in attention["reason"]


def _sdp_profile() -> None:
    folder = paths.user_profiles_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pascal-sdp.yaml").write_text("description: Pascal SDXL with PyTorch SDP\nextends: gtx1070-sdxl\n"
                                            "attention: sdp\n")


def test_forge_sdp_profile_without_xformers_in_the_venv_adds_no_flag(cli, tmp_path: Path) -> None:
    _sdp_profile()
    data = _plan(cli, tmp_path, "gtx1070-8gb", _tree(tmp_path, "forge", "sdxl", xformers=None), "-p", "pascal-sdp")
    assert not set(SDP_FLAGS) & set(data["args"]), data["args"]
    assert _decision(data, "attention")["value"] == "auto"


def test_forge_sdp_profile_with_a_working_xformers_turns_it_off_with_one_flag(cli, tmp_path: Path) -> None:
    """xformers 0.0.27 built for the venv's torch 2.3.1 would win: --attention-pytorch (which disables it) is the change;
    --disable-xformers beside it would change nothing."""
    _sdp_profile()
    tree = _tree(tmp_path, "forge", "sdxl", torch="2.3.1+cu121", xformers="0.0.27")
    data = _plan(cli, tmp_path, "gtx1070-8gb", tree, "-p", "pascal-sdp")
    assert "--attention-pytorch" in data["args"] and "--disable-xformers" not in data["args"]
    assert _decision(data, "attention")["value"] == "sdp"
