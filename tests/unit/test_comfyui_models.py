"""ComfyUI's model files (issue 19's first bullet): plan, estimate and doctor read models/checkpoints,
models/unet, models/diffusion_models and extra_model_paths.yaml; with several files the newest is planned
for and the plan says which were found."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.model_headers import write_gguf, write_model
from tests.fixtures.webui_trees import make_webui


@pytest.fixture
def comfy(tmp_path: Path, rtx3060_cwd: Path) -> Path:
    return make_webui(tmp_path / "ComfyUI", flavor="comfyui", version="0.3.64", family=None)


def _age(path: Path, seconds_ago: int) -> None:
    t = 1_700_000_000 - seconds_ago
    os.utime(path, (t, t))


def _model(out: str) -> dict[str, str]:
    return next(d for d in json.loads(out)["decisions"] if d["setting"] == "model")


def test_one_checkpoint_is_planned_for_without_model(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    write_model(comfy / "models" / "checkpoints" / "juggernaut.safetensors", "sdxl", "fp16", single_file=True)
    for command in ("plan", "estimate"):
        result = cli(command, "--webui", str(comfy))
        assert result.code == 0, result.err
    d = _model(cli("plan", "--webui", str(comfy), "--json").out)
    assert d["value"] == "sdxl" and d["source"] == "auto"
    assert d["reason"].startswith("ComfyUI picks a model per workflow: found one, juggernaut.safetensors (sdxl, fp16)")
    apply = cli("apply", "--webui", str(comfy), "--dry-run")
    assert apply.code == 0, apply.err


def test_several_files_plan_for_the_newest_and_say_so(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    models = comfy / "models"
    _age(write_model(models / "checkpoints" / "a.safetensors", "sdxl", "fp16", single_file=True), 300)
    _age(write_model(models / "diffusion_models" / "b.sft", "sd15", "fp16"), 10)
    _age(write_model(models / "checkpoints" / "c.safetensors", "sd2", "fp16", single_file=True), 200)
    d = _model(cli("plan", "--webui", str(comfy), "--json").out)
    assert d["value"] == "sd15"
    assert d["reason"] == ("ComfyUI picks a model per workflow: found 3 (a.safetensors, b.sft, c.safetensors); "
                           "planned for the newest, b.sft (sd15, fp16); --model FILE plans for another")
    doctor = cli("doctor", "--webui", str(comfy), "--json")
    check = next(c for c in json.loads(doctor.out)["checks"] if c["id"] == "webui.checkpoint")
    assert (check["status"], check["message"]) == ("ok", d["reason"])
    w = json.loads(doctor.out)["webui"]
    assert w["model_files"] == ["a.safetensors", "b.sft", "c.safetensors"] and w["checkpoint"] == "b.sft"


def test_a_gguf_in_unet_is_found_and_named(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    (comfy / "models" / "unet").mkdir(parents=True)
    write_gguf(comfy / "models" / "unet" / "flux1-dev-Q4_K_S.gguf", "flux1-dev", "q4_k_s")
    result = cli("plan", "--webui", str(comfy), "--json")
    assert result.code == 0 and "Traceback" not in result.err, result.err
    plan = json.loads(result.out)
    decided = {d["setting"]: d for d in plan["decisions"]}
    assert decided["model"]["value"] == "flux1-dev" and "flux1-dev-Q4_K_S.gguf" in decided["model"]["reason"]
    assert decided["model_format"]["value"] == "q4_k_s" and "ComfyUI-GGUF" in decided["model_format"]["reason"]
    doctor = cli("doctor", "--webui", str(comfy))
    assert "found one, flux1-dev-Q4_K_S.gguf (flux1-dev, q4_k_s)" in " ".join(doctor.out.split())


def test_model_file_plans_for_another_of_its_files(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    models = comfy / "models" / "checkpoints"
    _age(write_model(models / "old.safetensors", "sd15", "fp16", single_file=True), 300)
    _age(write_model(models / "new.safetensors", "sdxl", "fp16", single_file=True), 10)
    d = _model(cli("plan", "--webui", str(comfy), "--model", "old.safetensors", "--json").out)
    assert (d["value"], d["reason"]) == ("sd15", "--model FILE: old.safetensors is sd15 (fp16)")


def test_model_family_wins_over_the_newest_file(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    """ComfyUI selects nothing: a --model family is what the user runs, not overridden by a file."""
    write_model(comfy / "models" / "checkpoints" / "xl.safetensors", "sdxl", "fp16", single_file=True)
    d = _model(cli("plan", "--webui", str(comfy), "--model", "sd15", "--json").out)
    assert (d["value"], d["source"]) == ("sd15", "cli")


def test_extra_model_paths_yaml_is_read(cli, comfy: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared-models"
    write_model(shared / "ckpt" / "from-a1111.safetensors", "sd2", "fp16", single_file=True)
    (comfy / "extra_model_paths.yaml").write_text(
        f"a111:\n    base_path: {shared}\n    checkpoints: ckpt\n    vae: vae\n", encoding="utf-8")
    d = _model(cli("plan", "--webui", str(comfy), "--json").out)
    assert d["value"] == "sd2" and "from-a1111.safetensors" in d["reason"]


def test_a_broken_extra_model_paths_yaml_is_a_warning(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    write_model(comfy / "models" / "checkpoints" / "xl.safetensors", "sdxl", "fp16", single_file=True)
    (comfy / "extra_model_paths.yaml").write_text("a: [unclosed\n", encoding="utf-8")
    result = cli("plan", "--webui", str(comfy))
    assert result.code == 0, result.err
    assert "extra_model_paths.yaml is not valid YAML" in " ".join((result.out + result.err).split())


def test_no_model_file_says_where_it_looked(cli, comfy: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("plan", "--webui", str(comfy))
    assert result.code == 1 and "Traceback" not in result.err
    assert "has no model file in models/checkpoints, models/unet or models/diffusion_models" in result.err
    doctor = json.loads(cli("doctor", "--webui", str(comfy), "--json").out)
    check = next(c for c in doctor["checks"] if c["id"] == "webui.checkpoint")
    assert check["status"] == "warn" and "no model file" in check["message"]
