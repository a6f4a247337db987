"""`lowvram estimate`: the JSON contract, fits against a VRAM size, facts, profiles, the sweep, stats.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.fixtures.webui_trees import make_webui

CONTRACT_KEYS = ["schema", "peak_mb", "torch_peak_mb", "parts", "fits", "vram_mb", "headroom_mb", "max_square_px"]


def _facts(tmp_path: Path, total: int, free: int, os_name: str = "linux") -> Path:
    facts = {
        "schema": 1,
        "system": {"os": os_name, "os_version": "x", "ram_mb": 32000, "swap_mb": 0, "glibc": "2.36", "wsl": False},
        "gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": total,
                  "vram_free_mb": free, "driver": "535.1", "cuda_driver": "12.2", "compute_capability": "6.1",
                  "pcie_gen": 3, "pcie_width": 16}],
        "other_gpus": [], "tcmalloc": {"library": None, "usable": False, "reason": ""}, "webui": None, "checks": [],
    }
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    return path


def test_json_contract(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("estimate", "--model", "sdxl", "--width", "1024", "--height", "1024", "--vram-mb", "8192", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert list(data)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert data["schema"] == 1
    assert sum(data["parts"].values()) == data["peak_mb"]
    assert data["torch_peak_mb"] < data["peak_mb"]
    assert set(data["parts"]) >= {"weights_unet", "weights_text", "weights_vae", "activations", "attention",
                                  "vae_decode", "hires", "allocator_slack", "cuda_context"}
    assert data["vram_mb"] == 8192 and data["headroom_mb"] == 256
    assert data["fits"] is False  # plain SDXL 1024² on 8 GB: the reference says it does not fit
    assert data["max_square_px"] is None or data["max_square_px"] % 64 == 0
    assert data["request"]["model"] == "sdxl" and data["calibration"]["source"] == "reference"


def test_medvram_sdxl_fits_8gb_and_the_largest_square_is_reported(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("estimate", "--model", "sdxl", "--offload", "medvram-sdxl", "--vram-mb", "8192", "--json")
    data = json.loads(r.out)
    assert data["fits"] is True
    assert data["request"]["width"] == 1024  # the family's native size when none is given
    assert data["max_square_px"] >= 1024


def test_unknown_vram_gives_fits_null(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from lowvram.cli import cmd_estimate

    monkeypatch.setattr(cmd_estimate, "_vram_from_facts", lambda facts, notes: (None, None, None))
    r = cli("estimate", "--model", "sd15", "--json")
    data = json.loads(r.out)
    assert r.code == 0
    assert data["fits"] is None and data["vram_mb"] is None and data["max_square_px"] is None


def test_facts_give_vram_and_measured_headroom(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    facts = _facts(tmp_path, total=8192, free=7400)  # 792 MiB held by other programs
    data = json.loads(cli("estimate", "--model", "sd15", "--facts", str(facts), "--json").out)
    assert data["vram_mb"] == 8192 and data["headroom_mb"] == 792
    assert data["gpu"] == "NVIDIA GeForce GTX 1070" and data["fits"] is True
    facts = _facts(tmp_path, total=8192, free=8100, os_name="windows")
    data = json.loads(cli("estimate", "--model", "sd15", "--facts", str(facts), "--json").out)
    assert data["headroom_mb"] == 512  # the Windows floor (desktop compositor)


def test_profile_supplies_target_and_cli_wins(cli) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(cli("estimate", "--model", "sdxl", "--profile", "8gb-sdxl", "--vram-mb", "8192", "--json").out)
    assert (data["request"]["width"], data["request"]["height"]) == (1024, 1024)
    data = json.loads(cli("estimate", "--model", "sdxl", "--profile", "8gb-sdxl", "--width", "768",
                          "--vram-mb", "8192", "--json").out)
    assert data["request"]["width"] == 768


def test_missing_model_is_one_line_and_a_hint(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # No WebUI and A1111 the target would be SD 1.5 (tests/unit/test_first_commands.py); for ComfyUI
    # nothing says the family: the same error and exit code as plan's.
    r = cli("estimate", "--vram-mb", "8192", "--ui", "comfyui")
    assert r.code == 1
    assert "model family is unknown" in r.err and "--model" in r.err
    assert "Traceback" not in r.err
    r = cli("estimate", "--vram-mb", "8192", "--ui", "comfyui", "--json")
    assert json.loads(r.out)["error"]["hint"]


def test_sweep_table_and_json(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FORCE_COLOR", "1")
    r = cli("estimate", "--model", "sdxl", "--vram-mb", "8192", "--sweep")
    assert r.code == 0
    lines = r.out.splitlines()
    header = next(re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines if "size" in line)  # the header is bold
    assert header.split() == ["size", "none", "medvram-sdxl", "lowvram"]
    row_1024 = next(line for line in lines if line.startswith("1024²"))
    assert "\x1b[31m" in row_1024 and "\x1b[32m" in row_1024  # none does not fit (red), lowvram does (green)
    data = json.loads(cli("estimate", "--model", "sdxl", "--vram-mb", "8192", "--sweep", "--json").out)
    sweep = data["sweep"]
    assert {row["offload"] for row in sweep} == {"none", "medvram-sdxl", "lowvram"}
    by = {(row["width"], row["offload"]): row for row in sweep}
    assert by[(1024, "none")]["fits"] is False and by[(1024, "lowvram")]["fits"] is True
    assert by[(2048, "none")]["peak_mb"] > by[(512, "none")]["peak_mb"]


def test_text_output_shows_parts_and_verdict(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NO_COLOR", "1")
    r = cli("estimate", "--model", "sd15", "--width", "768", "--height", "512", "--batch", "2", "--vram-mb", "3584")
    assert r.code == 0
    assert "sd15 768x512, batch 2" in r.out
    assert "weights_unet" in r.out and "cuda_context" in r.out
    assert "does not fit in 3584 MiB" in r.out and "largest square that fits: 448 px" in r.out


def test_webui_stats_json_calibrates(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = make_webui(tmp_path / "webui", family="sd15", checkpoint="v1-5.safetensors")
    ext = root / "extensions" / "a1111-stable-diffusion-webui-vram-estimator"
    ext.mkdir(parents=True)
    recs = [{"width": w, "pixels": w * w, "batch_size": b, "active_peak": 500.0 * b * w / 512,
             "reserved_peak": 1400.0 * (w / 512) ** 2 * (1 + 0.2 * (b - 1)), "sys_peak": 0, "sys_total": 8192, "its": 1.0}
            for w in (256, 384, 512, 640, 768) for b in (1, 2)]
    text = json.dumps({"txt2img": recs, "txt2img_hr": [], "txt2img_hr_latent": [], "img2img": []})
    (ext / "stats.json").write_text(text[:-60])  # cut off: the extension died mid-write
    r = cli("estimate", "--webui", str(root), "--vram-mb", "8192", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    cal = data["calibration"]
    assert data["request"]["model"] == "sd15"  # from the WebUI's selected checkpoint
    assert cal["source"] == "stats.json" and cal["stats_points"] >= 8
    assert any("cut off" in s for s in cal["skipped"])
    assert cal["median_error"] is not None and data["margin"] == cal["margin"]


def test_bad_values_are_usage_errors(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("estimate", "--model", "flux").code == 2
    assert cli("estimate", "--model", "sd15", "--width", "0").code == 2
    r = cli("estimate", "--model", "sd15", "--webui", "/nonexistent/webui", "--vram-mb", "4096")
    assert r.code != 0 and "Traceback" not in r.err


def test_fits_is_tested_on_the_gpu_the_ui_would_use(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two GPUs and the user's own `--device-id 0` (CUDA's fastest first: the 12 GB card is device 0 … unless
    the UI is told otherwise): estimate must answer for the card the UI runs on, as plan does."""
    from dataclasses import replace

    from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts

    base = MACHINES["two-gpus"]  # GTX 1060 6 GB (PCI 0) + RTX 3060 12 GB (PCI 1)
    plain = write_facts(with_webui(base, "a1111", "sdxl"), tmp_path / "plain.json")
    data = json.loads(cli("estimate", "--model", "sdxl", "--facts", str(plain), "--json").out)
    assert data["vram_mb"] == 12288 and data["gpu"] == "NVIDIA GeForce RTX 3060"
    pinned = replace(with_webui(base, "a1111", "sdxl", user_args=("--device-id", "1")),
                     cuda=replace(base.cuda, device_order="PCI_BUS_ID"))
    path = write_facts(pinned, tmp_path / "pinned.json")
    data = json.loads(cli("estimate", "--model", "sdxl", "--facts", str(path), "--json").out)
    assert data["vram_mb"] == 12288
    small = replace(pinned, webui=replace(pinned.webui, user_args=("--device-id", "0")))
    path = write_facts(small, tmp_path / "small.json")
    data = json.loads(cli("estimate", "--model", "sdxl", "--facts", str(path), "--json").out)
    assert data["vram_mb"] == 6144 and data["gpu"] == "NVIDIA GeForce GTX 1060 6GB"
