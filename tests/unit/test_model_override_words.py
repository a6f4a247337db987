"""The model the plan is for, in words a user meets (issues 18 and 19).

1. `--model FAMILY` on an A1111 or Forge tree whose checkpoint is another family: the checkpoint wins
   (the UI loads it at start-up), and every planning command now says so in one warning line naming the
   file and the two ways to plan for the other model. Before, only `plan`'s model reason hinted at it.
2. `--model FILE` with no WebUI: the plan counted the file as bf16 whatever its header said, while
   `estimate` used the file's format. The plan now carries the file's format, and both agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import plan_inputs
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.model_headers import write_gguf, write_model
from tests.fixtures.webui_trees import make_webui

VERSIONS = {"a1111": "1.8.0", "forge": "f2.0.1v1.10.1"}
CHECKPOINT = "sd_xl_base_1.0.safetensors"
IGNORED = "warning: --model sd15 ignored: "
# Each planning command on a tree, as text and as --json (the key path to the plan's warnings).
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plan": (("plan",), ("warnings",)),
    "apply --dry-run": (("apply", "--dry-run"), ("plan", "warnings")),
    "apply": (("apply",), ("plan", "warnings")),
    "launch --dry-run": (("launch", "--dry-run"), ("warnings",)),
    "launch": (("launch",), ("plan", "warnings")),
}


@pytest.fixture
def facts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Offline: an empty mirror and no extensions planned, so `apply` and `launch` write the tree and finish
    # (the extensions have tests of their own; here only the words about the model count).
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setattr(plan_inputs, "load_registry", dict)
    return write_facts(MACHINES["rtx3060-12gb"], tmp_path / "rtx3060.json")


def _tree(tmp_path: Path, flavor: str, family: str | None = "sdxl") -> Path:
    return make_webui(tmp_path / f"{flavor}-{family}", flavor=flavor, version=VERSIONS[flavor], family=family)


def _run(cli: Any, command: str, tree: Path, facts_file: Path, model: str, *, as_json: bool) -> Any:
    args, _ = COMMANDS[command]
    result = cli(*args, *(["--json"] if as_json else []), "--webui", str(tree), "--facts", str(facts_file),
                 "--model", model)
    assert result.code == 0, result.err
    return result


def _json_warnings(command: str, out: str) -> list[str]:
    data: Any = json.loads(out)
    for key in COMMANDS[command][1]:
        data = data[key]
    return list(data)


@pytest.mark.parametrize("flavor", sorted(VERSIONS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_says_model_family_was_ignored_for_the_checkpoint(cli: Any, tmp_path: Path, facts_file: Path,
                                                                        flavor: str, command: str) -> None:
    tree = _tree(tmp_path, flavor)
    text = _run(cli, command, tree, facts_file, "sd15", as_json=False)
    said_text = text.out + text.err  # plan's screen holds its warnings; apply and launch say them on stderr
    lines = [line for line in said_text.splitlines() if line.startswith(IGNORED)]
    assert len(lines) == 1, said_text
    line = lines[0]
    assert f"'{CHECKPOINT}' (sdxl) at start-up, so this plan is for sdxl" in line
    assert "select a checkpoint of sd15 in the UI" in line and "--model FILE" in line

    said = [w for w in _json_warnings(command, _run(cli, command, tree, facts_file, "sd15", as_json=True).out)
            if w.startswith("--model sd15 ignored: ")]
    assert said == [line.removeprefix("warning: ")]


@pytest.mark.parametrize("flavor", sorted(VERSIONS))
def test_the_plan_is_still_for_the_checkpoint_the_ui_loads(cli: Any, tmp_path: Path, facts_file: Path,
                                                           flavor: str) -> None:
    data = json.loads(_run(cli, "plan", _tree(tmp_path, flavor), facts_file, "sd15", as_json=True).out)
    model = next(d for d in data["decisions"] if d["setting"] == "model")
    assert data["model_family"] == "sdxl" and model["value"] == "sdxl" and model["source"] == "auto"


@pytest.mark.parametrize("flavor", sorted(VERSIONS))
@pytest.mark.parametrize(("family", "model"), [("sdxl", "sdxl"), (None, "sd15"), (None, "sdxl")])
def test_no_warning_where_model_agrees_or_nothing_is_selected(cli: Any, tmp_path: Path, facts_file: Path,
                                                              flavor: str, family: str | None, model: str) -> None:
    tree = _tree(tmp_path, flavor, family)
    for command in ("plan", "apply --dry-run", "launch --dry-run"):
        text = _run(cli, command, tree, facts_file, model, as_json=False)
        assert "warning: --model" not in text.out + text.err
        warnings = _json_warnings(command, _run(cli, command, tree, facts_file, model, as_json=True).out)
        assert not [w for w in warnings if "ignored" in w]
    data = json.loads(_run(cli, "plan", tree, facts_file, model, as_json=True).out)
    assert data["model_family"] == model


# --model FILE with no WebUI: (writer, the format the file's header says)
FILES = {
    "flux-q4_k_s.gguf": (lambda p: write_gguf(p, "flux1-dev", "q4_k_s"), "q4_k_s"),
    "flux-q8_0.gguf": (lambda p: write_gguf(p, "flux1-dev", "q8_0"), "q8_0"),
    "flux-nf4.safetensors": (lambda p: write_model(p, "flux1-dev", "nf4"), "nf4"),
}


@pytest.mark.parametrize("name", list(FILES))
def test_model_file_without_a_webui_plans_the_files_format(cli: Any, tmp_path: Path, facts_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    writer, fmt = FILES[name]
    model = writer(tmp_path / "models" / name)
    monkeypatch.chdir(tmp_path)  # no WebUI here or above
    result = cli("plan", "--json", "--model", str(model), "--ui", "forge", "--facts", str(facts_file))
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert plan["webui"] is None and plan["model_family"] == "flux1-dev"
    decision = next(d for d in plan["decisions"] if d["setting"] == "model_format")
    assert decision["value"] == fmt and "from the model file's header" in decision["reason"]

    text = cli("plan", "--model", str(model), "--ui", "forge", "--facts", str(facts_file))
    assert text.code == 0, text.err
    assert any("model_format" in line and fmt in line for line in text.out.splitlines()), text.out

    est = cli("estimate", "--json", "--model", str(model), "--ui", "forge", "--facts", str(facts_file))
    assert est.code == 0, est.err
    estimate = json.loads(est.out)
    assert estimate["request"]["weight_format"] == fmt
    assert plan["estimate"]["peak_mb"] == estimate["peak_mb"]  # plan and estimate count the same file
