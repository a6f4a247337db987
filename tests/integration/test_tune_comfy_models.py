"""`lowvram tune` on ComfyUI with a diffusion-model-only file (issue 19 item 3's loose ends): the workflow
built from separate loaders (UNETLoader or ComfyUI-GGUF's UnetLoaderGGUF, the family's text encoders, its
VAE), checked node by node as the fake ComfyUI (tests/fixtures/comfy_api.py) receives it, refused in one
line when a file or node is missing; and the next plan running the load mode tune measured fastest."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lowvram.world import paths
from lowvram.world.observation_log import load_observations
from tests.fixtures.comfy_api import make_fake_comfy
from tests.fixtures.faults import GTX1070_LINUX
from tests.fixtures.model_headers import write_gguf, write_model, write_safetensors_model

CLIP_L = {"text_model.encoder.layers.0.mlp.fc1.weight": ("F16", [3072, 768])}
CLIP_G = {"text_model.encoder.layers.0.mlp.fc1.weight": ("F16", [5120, 1280]),
          "text_model.encoder.layers.30.mlp.fc1.weight": ("F16", [5120, 1280])}
T5XXL = {"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": ("F8_E4M3", [10240, 4096])}
VAE16 = {"decoder.conv_in.weight": ("F16", [512, 16, 3, 3])}
VAE4 = {"decoder.conv_in.weight": ("F16", [512, 4, 3, 3])}
TUNE = ("--width", "64", "--height", "64", "--steps", "2", "--repeats", "1")


def _facts(path: Path, vram_mb: int = 8192) -> Path:
    facts = copy.deepcopy(GTX1070_LINUX)
    facts["gpus"][0].update(vram_total_mb=vram_mb, vram_free_mb=vram_mb - 300)
    path.write_text(json.dumps(facts))
    return path


def _lowvram(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=240)


def _lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _tree(tmp_path: Path, **config: Any) -> Path:
    """A fake ComfyUI with no checkpoint: the test puts the model it plans for in models/unet."""
    config = {"log": str(tmp_path / "starts.jsonl"), "graphs": str(tmp_path / "graphs.jsonl"), **config}
    root = make_fake_comfy(tmp_path / "ComfyUI", config, tmp_path / "fake.json")
    (root / "models" / "checkpoints" / "sd15.safetensors").unlink()
    return root


def _flux_files(root: Path, *, gguf_nodes: bool = True, clip_l: bool = True) -> None:
    models = root / "models"
    write_gguf(models / "unet" / "flux1-dev-Q4_K_S.gguf", "flux1-dev", "q4_k_s")
    # Named so that only their headers say what they are (the header is the rule; the name is the fallback).
    write_safetensors_model(models / "text_encoders" / "encoder_a.safetensors", T5XXL)
    if clip_l:
        write_safetensors_model(models / "clip" / "encoder_b.safetensors", CLIP_L)
    write_safetensors_model(models / "vae" / "ae.safetensors", VAE16)
    write_safetensors_model(models / "vae" / "sdxl_vae.safetensors", VAE4)  # newer, but 4 channels: not Flux's
    if gguf_nodes:
        (root / "custom_nodes" / "ComfyUI-GGUF").mkdir(parents=True)


def test_a_flux_gguf_is_tuned_through_separate_loaders_checked_node_by_node(tmp_path: Path) -> None:
    root = _tree(tmp_path, seconds={"default": 0.05})
    _flux_files(root)
    done = _lowvram("tune", "--webui", str(root), "--facts", str(_facts(tmp_path / "f.json")), *TUNE, "--json")
    assert done.returncode == 0, done.stderr
    assert ("the workflow loads the model with UnetLoaderGGUF flux1-dev-Q4_K_S.gguf, DualCLIPLoader "
            "encoder_a.safetensors + encoder_b.safetensors, VAELoader ae.safetensors") in done.stderr
    result = json.loads(done.stdout)
    assert result["probes"] and all(p["ok"] for p in result["probes"]), result["probes"]
    graphs = _lines(tmp_path / "graphs.jsonl")
    assert len(graphs) == 2 * len(result["probes"])  # a warm-up and one measured workflow per candidate
    for graph in graphs:
        assert graph["1"] == {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "flux1-dev-Q4_K_S.gguf"}}
        assert graph["8"] == {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "encoder_a.safetensors", "clip_name2": "encoder_b.safetensors", "type": "flux"}}
        assert graph["9"] == {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
        assert graph["2"]["inputs"]["clip"] == ["8", 0] and graph["3"]["inputs"]["clip"] == ["8", 0]
        assert graph["4"] == {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64,
                                                                              "batch_size": 1}}
        sampler = graph["5"]["inputs"]
        assert sampler["model"] == ["1", 0] and sampler["cfg"] == 1.0 and sampler["steps"] == 2
        assert graph["6"]["inputs"] == {"samples": ["5", 0], "vae": ["9", 0]}
        assert graph["7"]["class_type"] == "SaveImage"
        assert set(graph) == {"1", "2", "3", "4", "5", "6", "7", "8", "9"}


def test_sd35_in_diffusion_models_takes_unetloader_and_the_triple_loader(tmp_path: Path) -> None:
    root = _tree(tmp_path, seconds={"default": 0.02})
    models = root / "models"
    write_model(models / "diffusion_models" / "sd3.5_large.safetensors", "sd3.5-large", "fp8_e4m3fn")
    write_safetensors_model(models / "text_encoders" / "clip_g.safetensors", CLIP_G)
    write_safetensors_model(models / "text_encoders" / "clip_l.safetensors", CLIP_L)
    write_safetensors_model(models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", T5XXL)
    write_safetensors_model(models / "vae" / "sd3_vae.safetensors", VAE16)
    done = _lowvram("tune", "--webui", str(root), "--facts", str(_facts(tmp_path / "f.json")), *TUNE,
                    "--max-minutes", "0.05", "--json")
    assert done.returncode == 0, done.stderr
    graph = _lines(tmp_path / "graphs.jsonl")[0]
    assert graph["1"] == {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3.5_large.safetensors",
                                                                 "weight_dtype": "default"}}
    assert graph["8"] == {"class_type": "TripleCLIPLoader", "inputs": {
        "clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
        "clip_name3": "t5xxl_fp8_e4m3fn.safetensors"}}
    assert graph["9"]["inputs"] == {"vae_name": "sd3_vae.safetensors"}
    assert graph["4"]["class_type"] == "EmptySD3LatentImage" and graph["5"]["inputs"]["cfg"] == 4.5
    assert json.loads(done.stdout)["probes"][0]["ok"]


def test_a_missing_text_encoder_is_named_and_nothing_starts(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _flux_files(root, clip_l=False)
    done = _lowvram("tune", "--webui", str(root), "--facts", str(_facts(tmp_path / "f.json")), *TUNE)
    assert done.returncode == 1, done.stderr
    assert ("tune cannot build the FLUX.1 dev workflow for flux1-dev-Q4_K_S.gguf: no CLIP-L text encoder in "
            "models/text_encoders or models/clip") in done.stderr
    assert "Traceback" not in done.stderr
    assert not _lines(tmp_path / "starts.jsonl")  # ComfyUI never started


def test_a_gguf_without_comfyui_gguf_is_refused_before_starting(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _flux_files(root, gguf_nodes=False)
    done = _lowvram("tune", "--webui", str(root), "--facts", str(_facts(tmp_path / "f.json")), *TUNE)
    assert done.returncode == 1, done.stderr
    assert ("flux1-dev-Q4_K_S.gguf is a GGUF file and ComfyUI has no GGUF loader: custom_nodes/ComfyUI-GGUF is "
            "not installed") in done.stderr
    assert "Traceback" not in done.stderr and not _lines(tmp_path / "starts.jsonl")


def test_a_comfyui_gguf_that_did_not_load_stops_tune_after_one_start(tmp_path: Path) -> None:
    # The folder is there but its nodes are not (its `gguf` package missing): /object_info says so.
    root = _tree(tmp_path, gguf_broken=True)
    _flux_files(root)
    done = _lowvram("tune", "--webui", str(root), "--facts", str(_facts(tmp_path / "f.json")), *TUNE)
    assert done.returncode == 1, done.stderr
    assert "ComfyUI has no UnetLoaderGGUF node: custom_nodes/ComfyUI-GGUF did not load" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(_lines(tmp_path / "starts.jsonl")) == 1 and not _lines(tmp_path / "graphs.jsonl")


def _plan(root: Path, facts: Path) -> dict[str, Any]:
    done = _lowvram("plan", "--webui", str(root), "--facts", str(facts), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _offload(plan: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in plan["decisions"] if d["setting"] == "offload")


OLD_MODEL_MANAGEMENT = '''
if not args.normalvram and not args.cpu:
    if lowvram_available and total_vram <= 4096:
        print("Trying to enable lowvram mode because your GPU seems to have 4GB or less. If you don't want this use: --normalvram")
        set_vram_to = VRAMState.LOW_VRAM
'''


def test_after_a_tune_where_normalvram_was_fastest_the_plan_runs_it(tmp_path: Path) -> None:
    # A 3 GB card, an SD 1.5 checkpoint near its size, and a ComfyUI old enough to switch to lowvram by
    # itself on such a card: tune measures --normalvram too, and it is fastest.
    root = make_fake_comfy(tmp_path / "ComfyUI", {"seconds": {"default": 0.30, "normalvram": -0.25,
                                                              "lowvram": 0.30}}, tmp_path / "fake.json")
    (root / "comfy" / "model_management.py").write_text(OLD_MODEL_MANAGEMENT)
    facts = _facts(tmp_path / "f.json", vram_mb=3072)
    before = _plan(root, facts)
    assert "--normalvram" not in before["args"] and _offload(before)["source"] != "tuning"
    done = _lowvram("tune", "--webui", str(root), "--facts", str(facts), *TUNE, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {p["load_mode"] for p in result["probes"]} == {"default", "lowvram", "normalvram"}
    assert result["best"]["load_mode"] == "normalvram"
    modes = {o.load_mode for o in load_observations(paths.observations_path(root)).items if o.source == "tuning"}
    assert modes == {"default", "lowvram", "normalvram"}
    plan = _plan(root, facts)
    assert "--normalvram" in plan["args"] and "--lowvram" not in plan["args"], plan["args"]
    offload = _offload(plan)
    assert offload["value"] == "none" and offload["source"] == "tuning"
    assert "measured --normalvram fastest" in offload["reason"]
    assert "keeps ComfyUI from switching to lowvram by itself" in offload["reason"]


def test_after_a_tune_where_lowvram_was_fastest_the_plan_runs_it(tmp_path: Path) -> None:
    # A FLUX.1 GGUF near an 8 GB card: tune measures --lowvram beside no flag (--normalvram changes nothing on
    # v0.3.64: not measured); --lowvram wins, and the next plan runs it, saying it came from tuning.
    root = _tree(tmp_path, seconds={"default": 0.20, "lowvram": -0.15})
    _flux_files(root)
    facts = _facts(tmp_path / "f.json")
    before = _plan(root, facts)
    assert "--lowvram" not in before["args"] and _offload(before)["source"] != "tuning"
    done = _lowvram("tune", "--webui", str(root), "--facts", str(facts), *TUNE, "--json")
    assert done.returncode == 0, done.stderr
    assert {p["load_mode"] for p in json.loads(done.stdout)["probes"]} == {"default", "lowvram"}
    plan = _plan(root, facts)
    assert "--lowvram" in plan["args"] and "--normalvram" not in plan["args"], plan["args"]
    offload = _offload(plan)
    assert offload["value"] == "lowvram" and offload["source"] == "tuning"
    assert "measured --lowvram fastest" in offload["reason"] and "no load-mode flag" in offload["reason"]
