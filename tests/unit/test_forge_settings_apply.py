"""`apply` writes Forge's memory settings into its config.json as managed keys; `revert` takes them out
(byte for byte where nobody touched the file since, else only lowvram's keys)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_webui

USER_CONFIG = {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]", "forge_preset": "xl",
               "forge_inference_memory": 1024, "samples_format": "png", "ünïcode": "kept"}


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    return write_facts(MACHINES["gtx1070-8gb"], tmp_path / "gtx1070.json")


def _forge(tmp_path: Path, config: bytes | None, family: str = "sdxl") -> Path:
    tree = make_webui(tmp_path / "forge", flavor="forge", version=None, family=family,
                      torch="2.3.1+cu121", xformers=None)
    if config is None:
        (tree / "config.json").unlink()
    else:
        (tree / "config.json").write_bytes(config)
    return tree


def _user_bytes() -> bytes:
    # Forge's own format: indent 4, not ASCII-escaped, no newline at the end
    return json.dumps(USER_CONFIG, indent=4, ensure_ascii=False).encode("utf-8")


def _plan(cli: Any, tree: Path, facts: Path) -> dict[str, Any]:
    result = cli("plan", "--webui", str(tree), "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    return {d["setting"]: d["value"] for d in json.loads(result.out)["decisions"]}


def test_apply_writes_forge_memory_settings_and_revert_restores_bytes(cli, tmp_path: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    tree = _forge(tmp_path, _user_bytes())
    decided = _plan(cli, tree, facts)
    inference = decided["forge_inference_memory"]
    result = cli("apply", "--webui", str(tree), "--facts", str(facts))
    assert result.code == 0, result.err
    data = json.loads((tree / "config.json").read_text())
    assert data["forge_inference_memory"] == inference >= 1024
    assert data["xl_GPU_MB"] == decided["forge.gpu_weights_mb"] == 8192 - inference  # the 'xl' preset's page load
    assert data["samples_format"] == "png" and data["ünïcode"] == "kept"  # the user's settings stay
    assert "forge_async_loading" not in data  # decided only by tune
    said = result.out + result.err
    assert f"config.json wrote forge_inference_memory = {inference}" in said and "Queue and CPU" in said
    reverted = cli("revert", "--webui", str(tree))
    assert reverted.code == 0, reverted.err
    assert (tree / "config.json").read_bytes() == _user_bytes()


def test_dry_run_shows_the_keys_and_writes_nothing(cli, tmp_path: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    tree = _forge(tmp_path, _user_bytes())
    result = cli("apply", "--webui", str(tree), "--facts", str(facts), "--dry-run")
    assert result.code == 0, result.err
    said = result.out + result.err
    assert "config.json would write forge_inference_memory = " in said and "xl_GPU_MB = " in said
    assert "would modify config.json" in result.out
    assert (tree / "config.json").read_bytes() == _user_bytes()


def test_revert_keeps_the_users_edits_since(cli, tmp_path: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    tree = _forge(tmp_path, _user_bytes())
    assert cli("apply", "--webui", str(tree), "--facts", str(facts)).code == 0
    data = json.loads((tree / "config.json").read_text())
    data["samples_format"] = "webp"  # the user's own change in Forge's settings
    data["xl_GPU_MB"] = 5000  # the user dragged the slider and saved it as the preset's default
    data["new_key"] = [1, 2]
    (tree / "config.json").write_text(json.dumps(data, indent=4, ensure_ascii=False))
    assert cli("revert", "--webui", str(tree)).code == 0
    after = json.loads((tree / "config.json").read_text())
    assert after["forge_inference_memory"] == 1024  # lowvram's key, still as it wrote it: the user's value back
    assert after["xl_GPU_MB"] == 5000  # changed since: the user's
    assert after["samples_format"] == "webp" and after["new_key"] == [1, 2] and after["ünïcode"] == "kept"


def _tuned(tree: Path, inference: int, method: str, location: str, wall: float) -> None:
    """A Forge tune probe as world/tune/forge.py saves it (source tuning, the settings it ran with)."""
    from lowvram.core.markers import checkpoint_key
    from lowvram.core.observations import Observation
    from lowvram.world.observation_log import append_observation
    from lowvram.world.paths import observations_path

    ckpt = tree / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors"
    append_observation(observations_path(tree), Observation(
        time=1_000_000.0 + wall, source="tuning", checkpoint=checkpoint_key(ckpt.name, ckpt.stat().st_size, ckpt.stat().st_mtime), family="sdxl", width=1024,
        height=1024, batch=1, steps=4, sit=wall / 4, wall_s=wall, ok=True, vram_total_mb=8192, tag="tune",
        forge_inference_mb=inference, forge_swap_method=method, forge_swap_location=location))


def test_the_plan_uses_what_tune_measured_and_a_reapply_keeps_the_users_values(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                                 facts: Path) -> None:
    tree = _forge(tmp_path, _user_bytes())
    assert cli("apply", "--webui", str(tree), "--facts", str(facts)).code == 0
    _tuned(tree, 1536, "Async", "CPU", 9.0)
    _tuned(tree, 2048, "Queue", "CPU", 11.0)
    result = cli("plan", "--webui", str(tree), "--facts", str(facts), "--json")
    decided = {d["setting"]: d for d in json.loads(result.out)["decisions"]}
    assert decided["forge_inference_memory"]["value"] == 1536 and decided["forge_inference_memory"]["source"] == "tuning"
    assert decided["forge_async_loading"]["value"] == "Async" and "page load" in decided["forge_async_loading"]["reason"]
    assert decided["forge.gpu_weights_mb"]["value"] == 8192 - 1536
    assert cli("apply", "--webui", str(tree), "--facts", str(facts)).code == 0  # the tuned values over lowvram's
    data = json.loads((tree / "config.json").read_text())
    assert (data["forge_inference_memory"], data["xl_GPU_MB"]) == (1536, 8192 - 1536)
    assert (data["forge_async_loading"], data["forge_pin_shared_memory"]) == ("Async", "CPU")
    data["samples_format"] = "jpg"  # touched since: revert puts back the keys, not the bytes
    (tree / "config.json").write_text(json.dumps(data, indent=4, ensure_ascii=False))
    assert cli("revert", "--webui", str(tree)).code == 0
    after = json.loads((tree / "config.json").read_text())
    assert after["forge_inference_memory"] == 1024  # the user's, not lowvram's first value
    assert not {"xl_GPU_MB", "forge_async_loading", "forge_pin_shared_memory"} & set(after)
    assert after["samples_format"] == "jpg"


def test_no_config_yet_is_created_and_removed_again(cli, tmp_path: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    tree = _forge(tmp_path, None, family="sd15")
    assert cli("apply", "--webui", str(tree), "--facts", str(facts)).code == 0
    data = json.loads((tree / "config.json").read_text())
    assert set(data) == {"forge_inference_memory"}  # sd15: Forge's 'sd' preset has no GPU Weights setting
    assert cli("revert", "--webui", str(tree)).code == 0
    assert not (tree / "config.json").exists()


@pytest.mark.parametrize(("content", "says"), [
    (b'{"forge_preset": "xl",', "is not valid JSON"),
    (b"[1, 2, 3]", "holds a JSON list"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_a_damaged_config_is_one_line_and_nothing_is_written(cli, tmp_path: Path, facts: Path,  # type: ignore[no-untyped-def]
                                                              content: bytes, says: str) -> None:
    tree = _forge(tmp_path, content)
    user = (tree / "webui-user.sh").read_bytes()
    result = cli("apply", "--webui", str(tree), "--facts", str(facts))
    assert result.code == 1
    assert says in result.err and "Traceback" not in result.err and "nothing was changed" in result.err
    assert (tree / "config.json").read_bytes() == content
    assert (tree / "webui-user.sh").read_bytes() == user  # refused before the first write


def test_a_config_linked_out_of_the_tree_is_refused(cli, tmp_path: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    tree = _forge(tmp_path, None)
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(_user_bytes())
    os.symlink(outside, tree / "config.json")
    result = cli("apply", "--webui", str(tree), "--facts", str(facts))
    assert result.code == 1 and "Traceback" not in result.err
    assert outside.read_bytes() == _user_bytes() and (tree / "config.json").is_symlink()


@pytest.mark.parametrize(("ui", "has"), [("forge", True), ("forge-neo", False), ("reforge", False)])
def test_only_the_uis_with_the_slider_get_the_settings(cli, tmp_path: Path, facts: Path, ui: str,  # type: ignore[no-untyped-def]
                                                        has: bool) -> None:
    os.chdir(tmp_path)
    result = cli("plan", "--ui", ui, "--model", "sd15", "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    decided = {d["setting"]: d["value"] for d in json.loads(result.out)["decisions"]}
    assert ("forge_inference_memory" in decided) is has
