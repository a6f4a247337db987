"""Issue 17 §7: profile choices decided on evidence.

The SDXL VAE stays fp16 where the UI answers its fp16 NaN by itself (A1111's "Automatically revert VAE
to 32-bit floats", on by default since 1.5.0; Forge/ComfyUI never run it in fp16; SD.Next upcasts),
and the plan says so; `--disable-nan-check` switches A1111's answer off, so the plan adds
--no-half-vae there. `laptop-4gb-sdxl` targets SDXL's native 1024 px, and `tune` measures that size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.api_ui import ApiUi, make_api_webui, write_gtx1070_windows_facts
from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts


@pytest.fixture(autouse=True)
def _nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)


def _plan(cli: Any, facts: Path, *args: str) -> dict[str, Any]:
    res = cli("plan", "--json", "--facts", str(facts), *args)
    assert res.code == 0, res.err
    return dict(json.loads(res.out))


def _vae(plan: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in plan["decisions"] if d["setting"] == "precision.vae")


def _facts(tmp_path: Path, machine: str, ui: str, *, user_args: tuple[str, ...] | None = None) -> Path:
    return write_facts(with_webui(MACHINES[machine], ui, "sdxl", user_args=user_args), tmp_path / f"{ui}.json")


# ---- the SDXL VAE -----------------------------------------------------------------------------


def test_a1111_sdxl_keeps_the_vae_in_fp16_and_says_why(cli: Any, tmp_path: Path) -> None:
    plan = _plan(cli, _facts(tmp_path, "rtx3060-12gb", "a1111"))
    vae = _vae(plan)
    assert vae["value"] == "half" and "--no-half-vae" not in plan["args"]
    assert "Automatically revert VAE to 32-bit floats" in vae["reason"] and "1.5.0" in vae["reason"]
    assert "fp16-fixed VAE" in vae["reason"]


def test_disable_nan_check_turns_off_a1111s_retry_so_the_plan_adds_no_half_vae(cli: Any, tmp_path: Path) -> None:
    plan = _plan(cli, _facts(tmp_path, "rtx3060-12gb", "a1111", user_args=("--disable-nan-check",)))
    vae = _vae(plan)
    assert vae["value"] == "full" and "--disable-nan-check" in vae["reason"]
    assert "--no-half-vae" in plan["args"]
    text = cli("plan", "--facts", str(tmp_path / "a1111.json"))
    assert text.code == 0 and "--no-half-vae" in text.out


@pytest.mark.parametrize(("ui", "words"), [("forge", "never fp16 unless told"), ("comfyui", "never fp16 unless told"),
                                           ("sdnext", "force_upcast")])
def test_the_other_uis_own_answer_is_named(cli: Any, tmp_path: Path, ui: str, words: str) -> None:
    vae = _vae(_plan(cli, _facts(tmp_path, "rtx3060-12gb", ui)))
    assert vae["value"] == "half" and words in vae["reason"]


def test_on_a_4_gb_card_the_plan_says_the_fp32_retry_does_not_fit(cli: Any, tmp_path: Path) -> None:
    vae = _vae(_plan(cli, _facts(tmp_path, "gtx1650-4gb", "a1111")))
    assert vae["value"] == "half" and "does not fit" in vae["reason"] and "fp16-fixed SDXL VAE" in vae["reason"]


def test_sd15_keeps_the_plain_reason(cli: Any, tmp_path: Path) -> None:
    facts = write_facts(with_webui(MACHINES["rtx3060-12gb"], "a1111", "sd15"), tmp_path / "sd15.json")
    assert _vae(_plan(cli, facts))["reason"] == "VAE in fp16 (the default)"


# ---- laptop-4gb-sdxl: the size the user runs -----------------------------------------------------


def _laptop_facts(tmp_path: Path) -> Path:
    """An RTX 3050 Laptop (4 GB) on Linux: memory cannot spill, so tune has one road and one probe."""
    data = json.loads(write_gtx1070_windows_facts(tmp_path / "w.json").read_text())
    data["system"].update({"os": "linux", "sysmem_fallback": "unsupported", "glibc": "2.36"})
    data["gpus"][0].update({"name": "NVIDIA GeForce RTX 3050 Laptop GPU", "vram_total_mb": 4096,
                            "vram_free_mb": 3900, "compute_capability": "8.6"})
    path = tmp_path / "laptop.json"
    path.write_text(json.dumps(data))
    return path


def test_the_laptop_sdxl_profile_targets_sdxls_native_size(cli: Any, tmp_path: Path) -> None:
    plan = _plan(cli, _laptop_facts(tmp_path), "--model", "sdxl")
    assert plan["profile"] == "laptop-4gb-sdxl"
    assert (plan["extra"]["target"]["width"], plan["extra"]["target"]["height"]) == (1024, 1024)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiUi]:
    (tmp_path / "mirror").mkdir()  # extensions fail at once, offline, and tune goes on
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    ui = make_api_webui(tmp_path / "stable-diffusion-webui")
    yield ui
    ui.kill_all()


def test_tune_on_a_4_gb_laptop_measures_sdxl_at_1024(cli: Any, tree: ApiUi, tmp_path: Path) -> None:
    res = cli("tune", "--webui", str(tree.root), "--facts", str(_laptop_facts(tmp_path)), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["size"] == {"width": 1024, "height": 1024}
    sizes = {(r["width"], r["height"]) for r in tree.requests()}
    assert sizes == {(1024, 1024)}, sizes


def test_the_windows_gtx_1070_keeps_its_fp32_vae(cli: Any, tmp_path: Path) -> None:
    """pascal-sdxl / gtx1070-sdxl: fp32 from the start (A1111 would switch after the first NaN anyway,
    and fp16 buys no speed on Pascal)."""
    plan = _plan(cli, write_gtx1070_windows_facts(tmp_path / "g.json"), "--model", "sdxl")
    assert _vae(plan)["value"] == "full" and "--no-half-vae" in plan["args"]
