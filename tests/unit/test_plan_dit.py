"""`lowvram plan` for Flux.1, SD3 and SD3.5 on the UIs that run them (issue 18 items 3 and 4).

Facts files describe a WebUI of each flavor whose selected model file is a DiT in a given format (the
`webui.model_family`/`model_format` doctor --json reports); the plan runs through the real CLI. What a user
would notice: the exit code and the one error line where the UI cannot run the model, the flags (each one in
the UI's real flag list), no offload flag and no "will not fit" warning where the UI streams by itself, how
much streams per step, Forge's GPU Weights, ComfyUI's --reserve-vram only from evidence, and the warnings
that name a much faster format, a UI that cannot load the file, or too little RAM.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.core.observations import Observation
from lowvram.ui import adapter, parse_args
from lowvram.world import paths
from lowvram.world.observation_log import append_observation
from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts
from tests.fixtures.model_headers import write_gguf
from tests.fixtures.webui_trees import make_webui

CARDS = {6: "rtx2060-6gb", 8: "rtx4060-8gb-win", 12: "rtx3060-12gb", 24: "rtx4090-24gb"}
OFFLOAD_FLAGS = {"--always-low-vram", "--always-no-vram", "--lowvram", "--novram", "--medvram", "--medvram-sdxl"}
FORMATS_MB = {"nf4": 6385, "q8_0": 12078, "bf16": 22700}  # flux1-dev's transformer in each (estimate/dit.py)


def _facts(tmp_path: Path, machine: str, ui: str, family: str, fmt: str | None, *, version: str | None = None,
           ram_mb: int | None = None) -> Path:
    facts = with_webui(MACHINES[machine], ui, family, version=version)
    assert facts.webui is not None
    facts = replace(facts, webui=replace(facts.webui, model_format=fmt,
                                         checkpoint=f"{family}-{fmt}.safetensors"))
    if ram_mb is not None:
        facts = replace(facts, system=replace(facts.system, ram_mb=ram_mb))
    return write_facts(facts, tmp_path / f"{machine}-{ui}-{family}-{fmt}-{version}-{ram_mb}.json")


def _plan(cli: Any, facts: Path, *extra: str) -> dict[str, Any]:
    result = cli("plan", "--facts", str(facts), "--json", *extra)
    assert result.code == 0, result.out + result.err
    assert "Traceback" not in result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def _decided(data: dict[str, Any]) -> dict[str, Any]:
    return {d["setting"]: d for d in data["decisions"]}


def _one_error(result: Any, words: str, hint: str) -> None:
    assert result.code == 1, result.out + result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.err, result.err
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert lines[1].startswith("hint: ") and hint in lines[1], lines[1]


def _flags_in_the_uis_list(data: dict[str, Any]) -> None:
    """Every flag the plan writes exists in the UI's real flag list (ui/flags/*.txt) and parses strictly."""
    ui = adapter(data["ui"])
    flagset = ui.flagset(data["extra"]["ui_version"])
    parsed = parse_args(data["args"], flagset, strict=True, ui_title=ui.title)
    assert all(p.name in flagset for p in parsed), data["args"]


# ---- Forge and ComfyUI: what streams, at every card size ---------------------------------------


@pytest.mark.parametrize("ui", ["forge", "comfyui"])
@pytest.mark.parametrize("gb", sorted(CARDS))
@pytest.mark.parametrize("fmt", ["nf4", "q8_0", "bf16"])
def test_flux_on_forge_and_comfyui_streams_what_does_not_fit(cli, tmp_path: Path, ui: str, gb: int,  # type: ignore[no-untyped-def]
                                                             fmt: str) -> None:
    data = _plan(cli, _facts(tmp_path, CARDS[gb], ui, "flux1-dev", fmt))
    d = _decided(data)
    assert data["model_family"] == "flux1-dev" and d["model_format"]["value"] == fmt
    # The UI loads what fits and streams the rest by itself: no offload level, no rung flag.
    assert data["offload"] == "none" and d["offload"]["source"] == "auto"
    assert not OFFLOAD_FLAGS & set(data["args"]), data["args"]
    assert not any("not to fit" in w or "will not fit" in w for w in data["warnings"]), data["warnings"]
    _flags_in_the_uis_list(data)
    streamed = d["streaming"]["value"]
    vram = MACHINES[CARDS[gb]].gpus[0].vram_total_mb
    assert vram is not None
    if data["estimate"]["fits"]:
        assert streamed == 0 and "nothing streams" in d["streaming"]["reason"]
    else:
        # At least what the weights exceed the card by streams, never more than the whole model.
        assert FORMATS_MB[fmt] - vram < streamed < FORMATS_MB[fmt], streamed
        assert f"{streamed / 1024:.1f} GiB streamed from RAM per step" in d["streaming"]["reason"]
        assert f"{FORMATS_MB[fmt] / 1024:.1f} GiB of weights" in d["streaming"]["reason"]
        assert "does not fit whole" in d["estimate"]["reason"]


@pytest.mark.parametrize(("gb", "fmt", "streams"), [
    (24, "q8_0", False), (12, "nf4", False), (24, "bf16", True), (12, "q8_0", True), (8, "nf4", True),
    (6, "nf4", True), (8, "bf16", True),
])
def test_which_flux_formats_stream_on_which_card(cli, tmp_path: Path, gb: int, fmt: str,  # type: ignore[no-untyped-def]
                                                 streams: bool) -> None:
    data = _plan(cli, _facts(tmp_path, CARDS[gb], "forge", "flux1-dev", fmt))
    assert (_decided(data)["streaming"]["value"] > 0) is streams


def test_forge_gpu_weights_follow_the_inference_memory_it_decides(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for gb, fmt in ((8, "q8_0"), (12, "nf4"), (24, "bf16"), (6, "bf16")):
        data = _plan(cli, _facts(tmp_path, CARDS[gb], "forge", "flux1-dev", fmt))
        d = _decided(data)
        inference = d["forge_inference_memory"]["value"]
        vram = MACHINES[CARDS[gb]].gpus[0].vram_total_mb
        assert inference >= 1024 and inference % 64 == 0, inference
        assert d["forge.gpu_weights_mb"]["value"] == vram - inference
        assert f"GPU Weights (MB) {vram - inference}" in d["forge.gpu_weights_mb"]["reason"]
        assert "`lowvram apply` writes both into Forge's config.json" in d["forge.gpu_weights_mb"]["reason"]
        assert "--always-low-vram" not in data["args"]
    # Where the whole model fits with the VAE decode beside it, the inference memory covers the decode too
    # (no model reload per image); where it streams, only the sampling step (streaming is paid every step).
    fits = _decided(_plan(cli, _facts(tmp_path, CARDS[12], "forge", "flux1-dev", "nf4")))
    streams = _decided(_plan(cli, _facts(tmp_path, CARDS[8], "forge", "flux1-dev", "q8_0")))
    assert fits["forge_inference_memory"]["value"] > streams["forge_inference_memory"]["value"]
    assert "VAE decode" in fits["forge_inference_memory"]["reason"]


def test_forge_plan_text_says_what_streams_and_where_the_slider_is(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("plan", "--facts", str(_facts(tmp_path, CARDS[8], "forge", "flux1-dev", "q8_0")))
    assert result.code == 0, result.err
    assert "streamed from RAM per step" in result.out and "GPU Weights" in result.out
    assert "`lowvram apply` writes both into Forge's config.json" in result.out
    assert "flags lowvram adds: (none)" in result.out


def test_a_much_faster_format_is_named_with_the_command_that_shows_all(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _plan(cli, _facts(tmp_path, CARDS[8], "forge", "flux1-dev", "bf16"))
    faster = [w for w in data["warnings"] if "faster here than this bf16 file" in w]
    assert len(faster) == 1 and "`lowvram estimate --model flux1-dev --formats`" in faster[0], data["warnings"]
    # A file that already fits whole is never told to change.
    calm = _plan(cli, _facts(tmp_path, CARDS[24], "forge", "flux1-dev", "q8_0"))
    assert not any("faster here" in w for w in calm["warnings"]), calm["warnings"]


def test_too_little_ram_for_what_streams_is_warned(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    small = _plan(cli, _facts(tmp_path, CARDS[8], "comfyui", "flux1-dev", "bf16", ram_mb=16384))
    ram = [w for w in small["warnings"] if "of RAM" in w]
    assert len(ram) == 1 and "Windows pages to the pagefile" in ram[0], small["warnings"]
    plenty = _plan(cli, _facts(tmp_path, CARDS[8], "comfyui", "flux1-dev", "bf16", ram_mb=65536))
    assert not any("of RAM" in w for w in plenty["warnings"]), plenty["warnings"]


def test_the_file_format_unknown_counts_as_bf16(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _decided(_plan(cli, _facts(tmp_path, CARDS[12], "forge", "flux1-dev", None)))
    assert d["model_format"]["value"] == "bf16" and "unknown" in d["model_format"]["reason"]
    assert "flux1-dev (bf16)" in d["estimate"]["reason"]


# ---- what the UI can load, and the card's math ---------------------------------------------------


def test_comfyui_names_the_node_a_gguf_needs_and_warns_about_nf4(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gguf = _plan(cli, _facts(tmp_path, CARDS[8], "comfyui", "flux1-dev", "q4_k_s"))
    assert "ComfyUI-GGUF" in _decided(gguf)["model_format"]["reason"]
    assert not any("cannot load" in w for w in gguf["warnings"])
    nf4 = _plan(cli, _facts(tmp_path, CARDS[8], "comfyui", "flux1-dev", "nf4"))
    warned = [w for w in nf4["warnings"] if "cannot load this nf4 file" in w]
    assert len(warned) == 1 and "GGUF" in warned[0] and "Forge" in warned[0], nf4["warnings"]
    forge = _plan(cli, _facts(tmp_path, CARDS[8], "forge", "flux1-dev", "nf4"))
    assert not any("cannot load" in w for w in forge["warnings"])


def test_a_card_without_bf16_math_is_told_how_it_computes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pascal = _decided(_plan(cli, _facts(tmp_path, "gtx1070-8gb", "forge", "flux1-dev", "bf16")))
    assert "no bf16 math (compute capability 6.1 < 8.0)" in pascal["model_format"]["reason"]
    ampere = _decided(_plan(cli, _facts(tmp_path, CARDS[12], "forge", "flux1-dev", "bf16")))
    assert "bf16 math" not in ampere["model_format"]["reason"]


# ---- ComfyUI's --reserve-vram: only from evidence ------------------------------------------------


def test_comfyui_reserve_vram_only_after_an_oom_of_that_model(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tree = make_webui(tmp_path / "comfy", flavor="comfyui", version="0.3.40", family=None)
    write_gguf(tree / "models" / "unet" / "flux1-dev-Q8_0.gguf", "flux1-dev", "q8_0")
    facts = write_facts(MACHINES[CARDS[8]], tmp_path / "rtx4060.json")
    data = _plan(cli, facts, "--webui", str(tree))
    assert data["model_family"] == "flux1-dev" and _decided(data)["model_format"]["value"] == "q8_0"
    assert "--reserve-vram" not in data["args"]
    assert "no evidence" in _decided(data)["reserve_vram"]["reason"]
    append_observation(paths.observations_path(tree.resolve()),
                       Observation(time=1.7e9, source="manual", ooms=1, ok=False, reason="CUDA out of memory"))
    data = _plan(cli, facts, "--webui", str(tree))
    assert "--reserve-vram" in data["args"] and _decided(data)["reserve_vram"]["source"] == "observations"
    _flags_in_the_uis_list(data)


def test_comfyui_writes_no_reserve_flag_for_the_unet_families_either(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Issue 19: ComfyUI budgets from measured free memory for every family; the flag needs evidence.
    data = _plan(cli, write_facts(with_webui(MACHINES[CARDS[8]], "comfyui", "sdxl"), tmp_path / "sdxl.json"))
    assert "--reserve-vram" not in data["args"] and _decided(data)["reserve_vram"]["value"] is None


# ---- SD.Next and SD3/SD3.5 ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3-medium", "sd3.5-medium", "sd3.5-large", "flux1-schnell"])
@pytest.mark.parametrize("ui", ["forge", "comfyui", "sdnext"])
def test_every_dit_family_plans_on_the_uis_that_run_it(cli, tmp_path: Path, ui: str, family: str) -> None:  # type: ignore[no-untyped-def]
    data = _plan(cli, _facts(tmp_path, CARDS[8], ui, family, "fp8_e4m3fn"))
    d = _decided(data)
    assert data["model_family"] == family and data["offload"] == "none"
    assert "streaming" in d and d["estimate"]["value"] > 0
    assert not OFFLOAD_FLAGS & set(data["args"])
    assert data["extra"]["target"]["width"] == 1024
    _flags_in_the_uis_list(data)


# ---- A1111: SD3 medium from 1.10, nothing else ----------------------------------------------------------


def test_sd3_medium_on_a1111_110_plans_without_t5(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _plan(cli, _facts(tmp_path, CARDS[6], "a1111", "sd3-medium", "fp16", version="v1.10.1"))
    d = _decided(data)
    assert data["model_family"] == "sd3-medium" and d["t5"]["value"] == "off"
    assert "sd3_enable_t5" in d["t5"]["reason"]
    # A1111 has no partial loading: its ladder decides, as for SDXL (the 6 GB card needs --medvram).
    assert data["offload"] == "medvram" and "--medvram" in data["args"]
    assert "streaming" not in d
    _flags_in_the_uis_list(data)
    # Nothing for the 12 GB card to offload; the estimate counts no T5.
    big = _plan(cli, _facts(tmp_path, CARDS[12], "a1111", "sd3-medium", "fp16", version="v1.10.1"))
    assert big["offload"] == "none" and big["estimate"]["fits"] is True


def test_sd3_medium_on_a1111_19_is_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("plan", "--facts", str(_facts(tmp_path, CARDS[12], "a1111", "sd3-medium", "fp16",
                                                version="v1.9.4")))
    _one_error(result, "SD3 runs in A1111 from 1.10.0, this A1111 is 1.9.4", "git checkout v1.10.1")


def test_sd3_medium_on_an_a1111_of_unknown_version_is_warned(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    facts = with_webui(MACHINES[CARDS[12]], "a1111", "sd3-medium")
    assert facts.webui is not None
    path = write_facts(replace(facts, webui=replace(facts.webui, version=None)), tmp_path / "unknown.json")
    data = _plan(cli, path)
    assert any("SD3 medium runs in A1111 from 1.10.0" in w for w in data["warnings"]), data["warnings"]


@pytest.mark.parametrize(("family", "words"), [
    ("flux1-dev", "Flux.1 runs in Forge, ComfyUI or SD.Next, not A1111"),
    ("flux1-schnell", "Flux.1 runs in Forge, ComfyUI or SD.Next, not A1111"),
    ("sd3.5-large", "SD 3.5 runs in Forge, ComfyUI or SD.Next, not A1111"),
    ("sd3.5-medium", "SD 3.5 runs in Forge, ComfyUI or SD.Next, not A1111"),
])
@pytest.mark.parametrize("command", ["plan", "apply", "launch"])
def test_a_model_a1111_cannot_run_is_one_line_with_where_it_runs(cli, tmp_path: Path, family: str, words: str,  # type: ignore[no-untyped-def]
                                                                 command: str) -> None:
    extra = ("--dry-run",) if command != "plan" else ()
    result = cli(command, "--facts", str(_facts(tmp_path, CARDS[12], "a1111", family, "fp8_e4m3fn",
                                                version="v1.10.1")), *extra)
    _one_error(result, words, "lowvram setup --ui forge")


def test_no_webui_and_ui_a1111_with_flux_is_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    facts = write_facts(MACHINES[CARDS[12]], tmp_path / "bare.json")
    _one_error(cli("plan", "--facts", str(facts), "--model", "flux1-dev"), "not A1111", "lowvram setup --ui forge")
    data = _plan(cli, facts, "--model", "flux1-dev", "--ui", "forge")
    assert data["model_family"] == "flux1-dev" and _decided(data)["model_format"]["value"] == "bf16"
