"""`--model FAMILY|FILE` on every planning command (issue 18): the new families are accepted (one list,
core's), a model file is planned for as if the UI had it selected, and bad values are one line + hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.core.model_files import DETECTED_FAMILIES
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.model_headers import write_gguf, write_model
from tests.fixtures.webui_trees import make_webui

NEW_FAMILIES = ("flux1-dev", "flux1-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large")


@pytest.fixture
def cwd(rtx3060_cwd: Path) -> Path:
    return rtx3060_cwd


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    return write_facts(MACHINES["rtx3060-12gb"], tmp_path / "facts.json")


def _one_error(result, words: str, code: int) -> None:  # type: ignore[no-untyped-def]
    assert result.code == code, result.out + result.err
    assert "Traceback" not in result.out + result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.err
    assert words in lines[0], lines[0]


# item 1: the families -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "apply", "launch", "setup", "estimate"])
def test_help_lists_every_family(cli, command: str) -> None:  # type: ignore[no-untyped-def]
    result = cli(command, "--help")
    text = " ".join(result.out.split())
    assert "FAMILY|FILE" in text
    for family in DETECTED_FAMILIES:
        assert family in text, family


def test_completion_offers_the_families() -> None:
    from lowvram.cli.options import complete_model

    assert complete_model("") == list(DETECTED_FAMILIES)
    assert complete_model("sd3") == ["sd3-medium", "sd3.5-medium", "sd3.5-large"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("command", ["plan", "estimate", "apply", "launch"])
def test_new_families_stop_with_the_one_line_not_a_usage_error(cli, cwd: Path, facts: Path, command: str,
                                                               family: str) -> None:  # type: ignore[no-untyped-def]
    """No WebUI: the plan is for a fresh A1111 (1.10.1), which runs SD3 medium only (issue 18 item 4, which
    models all five): Flux.1 and SD 3.5 stop with one line naming the UIs that run them; estimate models all."""
    extra = ("--dry-run",) if command in ("apply", "launch") else ()
    result = cli(command, "--model", family, "--facts", str(facts), *extra)
    if command == "estimate" or (command == "plan" and family == "sd3-medium"):
        assert result.code in (0, 1) and family in result.out and "Traceback" not in result.err, result.err
    elif family == "sd3-medium":
        _one_error(result, "no WebUI", 1)
    else:
        _one_error(result, "runs in Forge, ComfyUI or SD.Next, not A1111", 1)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sdxl-refiner"])
def test_planned_families_still_plan(cli, cwd: Path, facts: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("plan", "--model", family, "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    model = next(d for d in json.loads(result.out)["decisions"] if d["setting"] == "model")
    assert (model["value"], model["source"]) == (family, "cli")


# item 2: --model FILE -------------------------------------------------------------------------


def _model_decision(out: str) -> dict[str, str]:
    return next(d for d in json.loads(out)["decisions"] if d["setting"] == "model")


def test_model_file_by_path_plans_for_its_family(cli, cwd: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    write_model(cwd / "my-xl.safetensors", "sdxl", "bf16", single_file=True)
    result = cli("plan", "--model", "my-xl.safetensors", "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    d = _model_decision(result.out)
    assert d["value"] == "sdxl" and d["source"] == "cli"
    assert d["reason"] == "--model FILE: my-xl.safetensors is sdxl (bf16)"
    absolute = cli("plan", "--model", str(cwd / "my-xl.safetensors"), "--facts", str(facts), "--json")
    assert _model_decision(absolute.out)["reason"] == d["reason"]


def test_model_file_replaces_the_trees_checkpoint(cli, cwd: Path, tmp_path: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    """An A1111 tree with SDXL selected, and --model naming an SD 1.5 file in its model folder by name."""
    root = make_webui(tmp_path / "a1111")
    write_model(root / "models" / "Stable-diffusion" / "dream.safetensors", "sd15", "fp16", single_file=True)
    result = cli("plan", "--webui", str(root), "--model", "dream.safetensors", "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    d = _model_decision(result.out)
    assert (d["value"], d["reason"]) == ("sd15", "--model FILE: dream.safetensors is sd15 (fp16)")
    text = cli("plan", "--webui", str(root), "--model", "dream.safetensors", "--facts", str(facts))
    assert "model sd15" in text.out


def test_model_file_of_an_unmodelled_family_names_the_file(cli, cwd: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    write_gguf(cwd / "flux.gguf", "flux1-dev", "q4_k_s")
    result = cli("plan", "--model", "flux.gguf", "--facts", str(facts))
    _one_error(result, "flux1-dev: Flux.1 runs in Forge, ComfyUI or SD.Next, not A1111", 1)
    result = cli("plan", "--model", "flux.gguf", "--ui", "forge", "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    assert _model_decision(result.out)["reason"] == "--model FILE: flux.gguf is flux1-dev (q4_k_s)"


def test_estimate_takes_a_model_file(cli, cwd: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    write_model(cwd / "one.safetensors", "sd15", "fp16", single_file=True)
    result = cli("estimate", "--model", "one.safetensors", "--facts", str(facts), "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["request"]["model"] == "sd15"


def test_a_family_name_is_the_family_even_where_a_file_has_that_name(cli, cwd: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    write_model(cwd / "sdxl", "sd15", "fp16", single_file=True)
    result = cli("plan", "--model", "sdxl", "--facts", str(facts), "--json")
    assert _model_decision(result.out)["value"] == "sdxl"


@pytest.mark.parametrize(("value", "make", "words"), [
    ("nothere.safetensors", None, "not a model family, and no such file here"),
    ("sdxxl", None, "--model sdxxl: not a model family"),
    ("folder", "dir", "is a folder, not a model file"),
    ("notes.txt", "text", "is not a model file (.safetensors, .sft or .gguf)"),
    ("old.ckpt", "text", "is a pickle (.ckpt): lowvram never opens one"),
])
def test_a_value_that_is_no_model_file_is_a_usage_error(cli, cwd: Path, facts: Path, value: str, make: str | None,
                                                       words: str) -> None:  # type: ignore[no-untyped-def]
    if make == "dir":
        (cwd / value).mkdir()
    elif make == "text":
        (cwd / value).write_text("hello")
    for command in ("plan", "estimate"):
        _one_error(cli(command, "--model", value, "--facts", str(facts)), words, 2)


def test_a_model_file_of_unknown_family_says_parameters_and_format(cli, cwd: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.fixtures.model_headers import write_safetensors_model

    write_safetensors_model(cwd / "odd.safetensors", {"foo.weight": ("F16", [4, 3])})
    result = cli("plan", "--model", "odd.safetensors", "--facts", str(facts))
    _one_error(result, "cannot tell the model family of odd.safetensors: unknown (12 parameters, format fp16)", 1)


def test_a_damaged_model_file_is_one_line(cli, cwd: Path, facts: Path) -> None:  # type: ignore[no-untyped-def]
    (cwd / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    result = cli("plan", "--model", "cut.safetensors", "--facts", str(facts))
    _one_error(result, "cut.safetensors", 1)
