"""`lowvram plan` and `lowvram profiles` end to end (in-process CLI, fixture WebUI trees, facts files)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lowvram.ui.base import load_flagset
from lowvram.world import state
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_webui

PLAN_KEYS = {"schema", "profile", "ui", "webui", "args", "env", "tcmalloc", "extensions", "road", "reserve",
             "headroom_mb", "hook", "estimate", "decisions", "warnings"}
RESERVE_KEYS = {"mode", "mb", "applied", "free_dedicated_mb", "overflow_mb", "clamped_by", "source", "reason"}


def a1111_accepts(args: list[str]) -> None:
    """Build A1111 1.8's parser shape from its flag list and parse strictly (exit 2 = refused)."""
    parser = argparse.ArgumentParser(prog="launch.py")
    for spec in load_flagset("a1111-1.8.txt", "A1111 1.8").flags.values():
        if spec.kind == "flag":
            parser.add_argument(spec.name, action="store_true")
        elif spec.kind == "values":
            parser.add_argument(spec.name, nargs="+")
        else:
            parser.add_argument(spec.name, choices=spec.choices or None)
    parser.parse_args(args)


@pytest.fixture
def gtx1070_facts(tmp_path: Path) -> Path:
    return write_facts(MACHINES["gtx1070-8gb"], tmp_path / "gtx1070.json")


def test_plan_gtx1070_profile_json_contract(cli) -> None:
    result = cli("plan", "--profile", "gtx1070-sdxl", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert next(iter(data)) == "schema" and data["schema"] == 1
    assert set(data) >= PLAN_KEYS
    assert set(data["reserve"]) >= RESERVE_KEYS
    assert set(data["tcmalloc"]) >= {"enabled", "library", "reason"}
    assert set(data["hook"]) >= {"enabled", "reason"} and set(data["estimate"]) >= {"peak_mb", "fits"}
    assert all(set(d) >= {"setting", "value", "source", "reason"} for d in data["decisions"])
    assert data["profile"] == "gtx1070-sdxl" and data["ui"] == "a1111"
    assert "--medvram-sdxl" in data["args"] and "--xformers" in data["args"]
    assert data["env"]["COMMANDLINE_ARGS"] == " ".join(data["args"])
    a1111_accepts(data["args"])
    offload = next(d for d in data["decisions"] if d["setting"] == "offload")
    assert offload["source"] == "profile" and offload["reason"]


def test_plan_from_a_gtx1070_facts_file_with_model_sdxl(cli, gtx1070_facts: Path) -> None:
    result = cli("plan", "--facts", str(gtx1070_facts), "--model", "sdxl", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["profile"] == "gtx1070-sdxl"
    assert {"--medvram-sdxl", "--xformers"} <= set(data["args"])
    assert data["env"]["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")
    selection = next(d for d in data["decisions"] if d["setting"] == "profile")
    assert selection["source"] == "auto" and "GTX 1070" in selection["reason"]
    a1111_accepts(data["args"])


def test_plan_with_facts_from_env_variable(cli, gtx1070_facts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWVRAM_FACTS", str(gtx1070_facts))
    data = json.loads(cli("plan", "--model", "sd15", "--json").out)
    assert data["profile"] == "pascal-sd15"


@pytest.mark.parametrize(("flavor", "present", "absent"), [
    # Forge runs the VAE in fp32 by itself on Pascal: no --vae-in-fp32 (tests/unit/test_forge_flags_hold.py)
    ("forge", {"--xformers"}, {"--medvram-sdxl", "--medvram", "--no-half-vae", "--vae-in-fp32"}),
    # ComfyUI keeps its own reserve from the memory it measures free: --reserve-vram only from evidence
    ("comfyui", set(), {"--reserve-vram", "--medvram-sdxl", "--xformers", "--no-half-vae"}),
])
def test_webui_tree_of_another_ui_gets_its_flags(cli, tmp_path: Path, gtx1070_facts: Path, flavor: str,
                                                 present: set[str], absent: set[str]) -> None:
    tree = make_webui(tmp_path / flavor, flavor=flavor, version=None if flavor == "forge" else "0.3.40",
                      torch="2.3.1+cu121", xformers=None)
    result = cli("plan", "--webui", str(tree), "--facts", str(gtx1070_facts), "--model", "sdxl", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["ui"] == flavor and data["webui"] == str(tree.resolve())
    assert present <= set(data["args"]), data["args"]
    assert not absent & set(data["args"])
    assert data["hook"]["enabled"] is False


def test_a1111_tree_reads_its_checkpoint_family(cli, tmp_path: Path, gtx1070_facts: Path) -> None:
    tree = make_webui(tmp_path / "a1111", flavor="a1111", family="sd15", checkpoint="v1-5.safetensors")
    data = json.loads(cli("plan", "--webui", str(tree), "--facts", str(gtx1070_facts), "--json").out)
    model = next(d for d in data["decisions"] if d["setting"] == "model")
    assert model["value"] == "sd15" and "v1-5.safetensors" in model["reason"]
    assert data["env"]["LOWVRAM_CONFIG"].endswith("hook.json")


def test_plan_changes_nothing_and_remembers_nothing(cli, tmp_path: Path, gtx1070_facts: Path,
                                                    lowvram_home: Path) -> None:
    tree = make_webui(tmp_path / "a1111", flavor="a1111")
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    assert cli("plan", "--webui", str(tree), "--facts", str(gtx1070_facts), "--profile", "8gb-sdxl").code == 0
    after = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    assert before == after
    assert list(lowvram_home.iterdir()) == []


def test_remembered_profile_is_used_and_says_so(cli, tmp_path: Path, gtx1070_facts: Path) -> None:
    tree = make_webui(tmp_path / "a1111", flavor="a1111")
    state.remember(tree, "8gb-sdxl")
    data = json.loads(cli("plan", "--webui", str(tree), "--facts", str(gtx1070_facts), "--json").out)
    assert data["profile"] == "8gb-sdxl"
    assert next(d for d in data["decisions"] if d["setting"] == "profile")["source"] == "remembered"
    auto = json.loads(cli("plan", "--webui", str(tree), "--facts", str(gtx1070_facts), "--profile", "auto",
                          "--json").out)
    assert auto["profile"] == "gtx1070-sdxl"


def test_human_plan_shows_decisions_with_reasons_and_flags(cli, gtx1070_facts: Path) -> None:
    result = cli("plan", "--facts", str(gtx1070_facts), "--model", "sdxl")
    assert result.code == 0
    assert "setting" in result.out and "why" in result.out
    assert "offload" in result.out and "medvram-sdxl" in result.out
    assert "flags lowvram adds: --medvram-sdxl --xformers --no-half-vae" in result.out
    assert "facts from a file" in result.out


def test_unknown_profile_is_one_line_with_suggestions(cli) -> None:
    result = cli("plan", "--profile", "gtx1070-sxdl", "--json")
    assert result.code == 1
    assert "Traceback" not in result.err
    data = json.loads(result.out)
    assert data["schema"] == 1 and "no profile named" in data["error"]["message"]
    assert "gtx1070-sdxl" in data["error"]["hint"]


def test_no_family_asks_for_model(cli, gtx1070_facts: Path) -> None:
    # No WebUI and A1111 the target: the SD 1.5 a fresh A1111 downloads (tests/unit/test_first_commands.py);
    # for ComfyUI nothing says the family.
    result = cli("plan", "--facts", str(gtx1070_facts), "--ui", "comfyui")
    assert result.code == 1
    assert "model family is unknown" in result.err and "--model" in result.err


def test_bad_option_value_is_a_usage_error(cli) -> None:
    assert cli("plan", "--offload", "medium").code == 2
    assert cli("plan", "--ui", "invokeai").code == 2


def test_profiles_list_json_contract(cli) -> None:
    result = cli("profiles", "list", "--json")
    assert result.code == 0
    data = json.loads(result.out)
    assert next(iter(data)) == "schema"
    names = {p["name"]: p for p in data["profiles"]}
    assert {"gtx1070-sdxl", "8gb-sdxl", "cpu"} <= set(names)
    for p in data["profiles"]:
        assert set(p) == {"name", "description", "source", "path", "extends"}
    assert names["gtx1070-sdxl"]["extends"] == "8gb-sdxl" and names["gtx1070-sdxl"]["source"] == "bundled"


def test_profiles_show_gtx1070_shows_inherited_values_and_origins(cli) -> None:
    result = cli("profiles", "show", "gtx1070-sdxl")
    assert result.code == 0
    lines = result.out.splitlines()
    assert any(line.startswith("offload") and "medvram-sdxl" in line and line.rstrip().endswith("gtx1070-sdxl")
               for line in lines)
    assert any(line.startswith("target.width") and "1024" in line and "8gb-sdxl (inherited)" in line for line in lines)
    assert "extends: 8gb-sdxl" in result.out
    data = json.loads(cli("profiles", "show", "gtx1070-sdxl", "--json").out)
    assert next(iter(data)) == "schema"
    assert set(data) == {"schema", "name", "source", "path", "extends", "chain", "profile", "origins"}
    assert data["chain"] == ["gtx1070-sdxl", "8gb-sdxl"]
    assert data["origins"]["target.width"] == "8gb-sdxl" and data["origins"]["attention"] == "gtx1070-sdxl"
    assert data["profile"]["offload"] == "medvram-sdxl"


def test_broken_user_profile_is_one_warning_and_the_others_still_list(cli, lowvram_home: Path) -> None:
    d = lowvram_home / "profiles"
    d.mkdir()
    (d / "mine.yaml").write_text("description: x\nattention: xformer\n")
    result = cli("profiles", "list")
    assert result.code == 0
    [line] = [line for line in result.err.splitlines() if "mine.yaml" in line]
    assert line.startswith("warning: profile mine is skipped: ") and "mine.yaml:2: `attention` should be one of" in line
    assert "did you mean `xformers`?" in line
    assert "gtx1070-sdxl" in result.out and "mine" not in result.out.split("user profiles:")[0]


def test_lowvram_hook_off_disables_the_hook(cli, gtx1070_facts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWVRAM_HOOK", "off")
    data = json.loads(cli("plan", "--facts", str(gtx1070_facts), "--model", "sdxl", "--json").out)
    assert data["hook"]["enabled"] is False and "LOWVRAM_CONFIG" not in data["env"]


def test_forge_plan_says_where_gpu_weights_should_be(cli, tmp_path: Path, gtx1070_facts: Path) -> None:
    tree = make_webui(tmp_path / "forge", flavor="forge", version=None, torch="2.3.1+cu121", xformers=None)
    data = json.loads(cli("plan", "--webui", str(tree), "--facts", str(gtx1070_facts), "--model", "sdxl",
                          "--json").out)
    weights = next(d for d in data["decisions"] if d["setting"] == "forge.gpu_weights_mb")
    inference = next(d for d in data["decisions"] if d["setting"] == "forge_inference_memory")
    # SDXL too gets its inference memory from the estimate (never below Forge's 1024), GPU Weights = total − it
    assert inference["value"] >= 1024 and inference["value"] % 64 == 0 and "SDXL" not in inference["reason"]
    assert weights["value"] == 8192 - inference["value"] and "GPU Weights" in weights["reason"]
