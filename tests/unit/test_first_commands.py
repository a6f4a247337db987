"""The first commands a new user types (issue 16, items 1-3): which WebUI, which model family.

1. `--ui` names the UI to plan for where no WebUI is found; one that contradicts the WebUI found is
   one usage error (exit 2) naming the tree and its UI, never a plan or a launch for another UI there.
2. Nothing given: where the family is obvious it is taken and said (a fresh A1111 downloads SD 1.5; a
   profile made for one family implies it); where it is not, the error says which choice settles it,
   with the same exit code from `plan` and `estimate`.
3. One lookup rule for every command: --webui, $LOWVRAM_WEBUI, the current folder or a folder above
   it, the remembered one; the same tree is found from the same place by every command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import paths, state
from tests.conftest import CliResult
from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts
from tests.fixtures.git_repos import tree_snapshot
from tests.fixtures.webui_trees import make_webui

Run = Callable[..., CliResult]


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    """A GTX 1070 on Linux, no WebUI in the file: the WebUI comes from the lookup."""
    return write_facts(MACHINES["gtx1070-8gb"], tmp_path / "gtx1070.json")


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's working folder: no WebUI in it or above it."""
    folder = tmp_path / "home" / "user"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    return folder


def _error(result: CliResult) -> tuple[str, str]:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert "Traceback" not in result.err and "unexpected error" not in result.err, result.err
    assert lines and lines[0].startswith("error: ") and lines[-1].startswith("hint: "), result.err
    joined = " ".join(lines)  # the lines may wrap at the terminal's width
    message, hint = joined.split("hint: ", 1)
    return message, hint


# ---------------------------------------------------------------------------------------------
# 1. --ui that contradicts the WebUI found


@pytest.fixture
def remembered_a1111(tmp_path: Path, elsewhere: Path) -> Path:
    tree = make_webui(tmp_path / "stable-diffusion-webui", flavor="a1111", family="sdxl")
    state.remember(tree)
    return tree


UI_COMMANDS = {
    "plan": ("plan",),
    "apply": ("apply",),
    "apply --dry-run": ("apply", "--dry-run"),
    "launch": ("launch",),
    "launch --dry-run": ("launch", "--dry-run"),
    "estimate": ("estimate",),
}


@pytest.mark.parametrize("command", sorted(UI_COMMANDS))
def test_ui_contradicting_the_remembered_webui_is_one_usage_error(cli: Run, remembered_a1111: Path, facts_file: Path,
                                                                  command: str) -> None:
    before = tree_snapshot(remembered_a1111)
    result = cli(*UI_COMMANDS[command], "--ui", "comfyui", "--facts", str(facts_file))
    assert result.code == 2, (result.out, result.err)
    message, hint = _error(result)
    assert str(remembered_a1111) in message and "A1111" in message and "remembered" in message
    assert "--ui comfyui" in message
    assert "--webui PATH" in hint and "drop --ui" in hint
    # Nothing planned for ComfyUI, nothing written, nothing started (no `python main.py` in an A1111 tree).
    assert "main.py" not in result.out and result.out == ""
    assert tree_snapshot(remembered_a1111) == before
    assert not paths.manifest_path(remembered_a1111).exists()


def test_ui_contradicting_the_webui_in_the_current_folder_or_given_is_refused(cli: Run, tmp_path: Path,
                                                                             facts_file: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    forge = make_webui(tmp_path / "forge", flavor="forge", version=None)
    comfy = make_webui(tmp_path / "ComfyUI", flavor="comfyui", version="0.3.40")
    monkeypatch.chdir(forge)
    result = cli("plan", "--ui", "a1111", "--facts", str(facts_file), "--json")
    assert result.code == 2
    error = json.loads(result.out)["error"]
    assert str(forge) in error["message"] and "Forge" in error["message"] and "current folder" in error["message"]
    result = cli("launch", "--dry-run", "--webui", str(comfy), "--ui", "a1111", "--facts", str(facts_file))
    assert result.code == 2
    message, _hint = _error(result)
    assert str(comfy) in message and "ComfyUI" in message and "--webui" in message


def test_ui_that_matches_the_webui_or_names_the_target_without_one_still_plans(cli: Run, remembered_a1111: Path,
                                                                               facts_file: Path) -> None:
    data = json.loads(cli("plan", "--ui", "a1111", "--facts", str(facts_file), "--json").out)
    assert data["ui"] == "a1111" and data["webui"] == str(remembered_a1111)
    dry = cli("launch", "--dry-run", "--ui", "a1111", "--facts", str(facts_file), "--json")
    assert dry.code == 0, dry.err
    assert json.loads(dry.out)["launch"]["cwd"] == str(remembered_a1111)


def test_ui_contradicting_the_webui_of_a_facts_file_is_refused_too(cli: Run, tmp_path: Path, elsewhere: Path) -> None:
    facts = write_facts(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"), tmp_path / "a1111.json")
    for argv in (("plan",), ("estimate",)):
        result = cli(*argv, "--facts", str(facts), "--ui", "comfyui")
        assert result.code == 2
        message, hint = _error(result)
        assert "facts file" in message and "/srv/webui" in message and "drop --ui" in hint


# ---------------------------------------------------------------------------------------------
# 2. Nothing given: the family where it is obvious, the error that says what settles it where not


def _decision(plan: dict[str, Any], setting: str) -> dict[str, Any]:
    return next(d for d in plan["decisions"] if d["setting"] == setting)


@pytest.mark.parametrize("machine", ["gtx1070-8gb", "no-gpu"])
@pytest.mark.parametrize("extra", [(), ("--profile", "cpu"), ("--ui", "a1111")], ids=["plain", "cpu", "ui-a1111"])
def test_no_webui_plans_for_the_sd15_a_fresh_a1111_downloads(cli: Run, tmp_path: Path, elsewhere: Path,
                                                             machine: str, extra: tuple[str, ...]) -> None:
    facts = write_facts(MACHINES[machine], tmp_path / f"{machine}.json")
    result = cli("plan", "--facts", str(facts), "--json", *extra)
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    model = _decision(plan, "model")
    assert plan["model_family"] == "sd15" and model["value"] == "sd15" and model["source"] == "auto"
    assert "no WebUI found" in model["reason"] and "fresh A1111" in model["reason"] and "SD 1.5" in model["reason"]
    text = cli("plan", "--facts", str(facts), *extra)
    assert text.code == 0 and "model sd15" in text.out


def test_no_webui_apply_and_launch_say_there_is_no_webui_not_that_the_family_is_unknown(
        cli: Run, elsewhere: Path, facts_file: Path) -> None:
    for argv in (("apply",), ("launch",), ("launch", "--dry-run"), ("apply", "--profile", "cpu")):
        result = cli(*argv, "--facts", str(facts_file))
        assert result.code == 1, result.err
        message, hint = _error(result)
        assert "family" not in message and "no WebUI" in message and "--webui PATH" in hint


def test_a_profile_made_for_one_family_implies_it(cli: Run, elsewhere: Path, facts_file: Path) -> None:
    est = cli("estimate", "--profile", "gtx1070-sdxl", "--facts", str(facts_file), "--json")
    assert est.code == 0, est.err
    data = json.loads(est.out)
    assert data["request"]["model"] == "sdxl" and (data["request"]["width"], data["request"]["height"]) == (1024, 1024)
    assert any("profile gtx1070-sdxl is for sdxl" in n for n in data["notes"])
    plan = json.loads(cli("plan", "--profile", "gtx1070-sdxl", "--facts", str(facts_file), "--json").out)
    model = _decision(plan, "model")
    assert (model["value"], model["source"]) == ("sdxl", "profile")
    assert "profile gtx1070-sdxl is for sdxl" in model["reason"]
    # With no profile and no WebUI, estimate takes the same default as plan, and says so.
    data = json.loads(cli("estimate", "--facts", str(facts_file), "--json").out)
    assert data["request"]["model"] == "sd15" and any("fresh A1111" in n for n in data["notes"])


def test_a_profile_for_sd15_and_sd2_follows_an_sd2_checkpoint_in_estimate(cli: Run, tmp_path: Path,
                                                                          facts_file: Path) -> None:
    tree = make_webui(tmp_path / "sd", family="sd2", checkpoint="v2-1_768-ema-pruned.safetensors")
    data = json.loads(cli("estimate", "--webui", str(tree), "--profile", "8gb-sd15", "--facts", str(facts_file),
                          "--json").out)
    assert data["request"]["model"] == "sd2"


def _not_obvious(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    comfy = make_webui(tmp_path / "ComfyUI", flavor="comfyui", version="0.3.40", family=None)
    no_download = make_webui(tmp_path / "a1111-nodl", family=None,
                             webui_user_sh='export COMMANDLINE_ARGS="--no-download-sd-model"\n')
    return {
        "no-webui-comfyui": ("--ui", "comfyui"),
        "no-webui-forge": ("--ui", "forge"),
        "comfyui-without-checkpoint": ("--webui", str(comfy)),
        "a1111-no-download": ("--webui", str(no_download)),
    }


def test_where_nothing_says_the_family_plan_and_estimate_give_the_same_error_and_exit_code(
        cli: Run, tmp_path: Path, elsewhere: Path, facts_file: Path) -> None:
    for case, args in _not_obvious(tmp_path).items():
        plan = cli("plan", "--facts", str(facts_file), *args)
        est = cli("estimate", "--facts", str(facts_file), *args)
        assert plan.code == est.code == 1, (case, plan.err, est.err)
        plan_msg, plan_hint = _error(plan)
        est_msg, est_hint = _error(est)
        assert (plan_msg, plan_hint) == (est_msg, est_hint), case
        assert "model family is unknown" in plan_msg, case
        # The hint names the choices that settle it.
        assert "--model sd15, sd2 or sdxl" in plan_hint and "--profile" in plan_hint, case
        if case.startswith("no-webui"):
            assert "no WebUI found" in plan_msg and "--webui PATH" in plan_hint
        else:
            assert ("no checkpoint selected" in plan_msg or "has no model file in models/checkpoints" in plan_msg) \
                and args[1] in plan_msg
        assert cli("plan", "--facts", str(facts_file), *args, "--model", "sdxl").code == 0, case
        assert cli("estimate", "--facts", str(facts_file), *args, "--model", "sdxl").code == 0, case
        assert cli("plan", "--facts", str(facts_file), *args, "--profile", "8gb-sdxl").code == 0, case


def test_unreadable_checkpoint_gives_plan_and_estimate_the_same_exit_code(cli: Run, tmp_path: Path,
                                                                         facts_file: Path) -> None:
    tree = make_webui(tmp_path / "sd")
    ckpt = tree / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:20])
    plan = cli("plan", "--webui", str(tree), "--facts", str(facts_file))
    est = cli("estimate", "--webui", str(tree), "--facts", str(facts_file))
    assert plan.code == est.code == 1
    assert _error(plan) == _error(est)
    assert str(ckpt) in _error(plan)[0] and "--model" in _error(plan)[1]


# ---------------------------------------------------------------------------------------------
# 3. One lookup rule: the same tree from the same place, for every command


def _found(command: str, result: CliResult) -> str | None:
    """The WebUI path the command worked on, as its output says it."""
    if command == "tune":  # tune refuses an SD.Next tree, naming the tree it found
        message, _hint = _error(result)
        return message
    data = json.loads(result.out)
    if command == "doctor":
        return data["webui"]["path"] if data.get("webui") else None
    if command == "estimate":
        return " ".join(data["notes"])  # "WebUI at PATH (a1111)"
    return str(data["webui"])  # plan, apply, launch --dry-run (the plan's), reserve, install-extensions, revert


def _argv(command: str, facts: Path) -> tuple[str, ...]:
    with_facts = ("--facts", str(facts))
    return {
        "plan": ("plan", "--json", *with_facts),
        "apply": ("apply", "--dry-run", "--json", *with_facts),
        "launch": ("launch", "--dry-run", "--json", *with_facts),
        "doctor": ("doctor", "--json", *with_facts),
        "estimate": ("estimate", "--json", *with_facts),
        "reserve": ("reserve", "--json", *with_facts),
        "install-extensions": ("install-extensions", "giant-kitten", "--json"),
        "revert": ("revert", "--json"),
        "tune": ("tune", "--max-minutes", "0.05", *with_facts),
    }[command]


LOOKUP_COMMANDS = ("plan", "apply", "launch", "doctor", "estimate", "reserve", "install-extensions", "revert", "tune")
PLACES = ("webui-folder", "folder-inside-it", "remembered", "LOWVRAM_WEBUI")


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", LOOKUP_COMMANDS)
def test_every_command_finds_the_same_webui_from_the_same_place(cli: Run, tmp_path: Path, facts_file: Path,
                                                                monkeypatch: pytest.MonkeyPatch, command: str,
                                                                place: str) -> None:
    # SD.Next for tune (it refuses one at once, naming it: tune drives A1111, Forge and ComfyUI); A1111 for the rest.
    flavor = "sdnext" if command == "tune" else "a1111"
    tree = make_webui(tmp_path / "webui", flavor=flavor, version=None if flavor == "sdnext" else "1.8.0")
    mirror = tmp_path / "mirror"  # install-extensions: an empty mirror, so nothing is fetched
    mirror.mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cwd = {"webui-folder": tree, "folder-inside-it": tree / "models" / "Stable-diffusion"}.get(place, outside)
    monkeypatch.chdir(cwd)
    if place == "remembered":
        state.remember(tree)
    if place == "LOWVRAM_WEBUI":
        monkeypatch.setenv("LOWVRAM_WEBUI", str(tree))
    result = cli(*_argv(command, facts_file))
    assert "Traceback" not in result.err and "unexpected error" not in result.err, result.err
    found = _found(command, result)
    assert found is not None and str(tree.resolve()) in found, (command, place, result.out[:400], result.err)


@pytest.mark.parametrize("command", ["reserve", "install-extensions", "revert", "apply", "launch"])
def test_a_folder_that_only_looks_like_a_webui_is_found_by_no_command(cli: Run, tmp_path: Path, facts_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      command: str) -> None:
    """A folder with a webui.sh and a webui-user.sh but no A1111 in it: the looser lookup of
    install-extensions/revert took it for one (and fell back to A1111); no command does now."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "webui.sh").write_text("#!/bin/bash\n")
    (folder / "webui-user.sh").write_text("export COMMANDLINE_ARGS=\n")
    monkeypatch.chdir(folder)
    argv = {"reserve": ("reserve", "--facts", str(facts_file)), "install-extensions": ("install-extensions",),
            "revert": ("revert",), "apply": ("apply", "--facts", str(facts_file)),
            "launch": ("launch", "--facts", str(facts_file))}[command]
    result = cli(*argv)
    assert result.code == 1
    message, hint = _error(result)
    assert "no WebUI" in message and "--webui PATH" in hint
    assert sorted(p.name for p in folder.iterdir()) == ["webui-user.sh", "webui.sh"]


def test_revert_still_takes_a_tree_lowvram_applied_to_after_it_stopped_looking_like_one(
        cli: Run, tmp_path: Path, facts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"  # extensions: an empty mirror, so nothing is fetched
    mirror.mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror))
    tree = make_webui(tmp_path / "sd")
    before = (tree / "webui-user.sh").read_bytes()
    applied = cli("apply", "--webui", str(tree), "--facts", str(facts_file))
    assert paths.manifest_path(tree).exists(), applied.err
    assert (tree / "webui-user.sh").read_bytes() != before
    (tree / "modules" / "cmd_args.py").unlink()  # no longer detected as A1111
    assert cli("plan", "--webui", str(tree), "--facts", str(facts_file)).code == 1  # not a WebUI to plan for
    monkeypatch.chdir(tree)
    result = cli("revert", "--json")  # found in the current folder: lowvram's manifest vouches for it
    assert result.code == 0, result.err
    assert json.loads(result.out)["webui"] == str(tree.resolve())
    assert (tree / "webui-user.sh").read_bytes() == before
