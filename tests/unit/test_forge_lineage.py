"""Forge's lineage (issue 19 item 4): lllyasviel Forge, Forge Neo, Forge Classic and reForge told apart by
the files each really has, their own flag sets, Neo's torch on Pascal, and each UI's own version."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lowvram.core.facts import Facts
from tests.conftest import CliResult
from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts
from tests.fixtures.webui_trees import make_forge_lineage

FLAGS = Path(__file__).resolve().parents[2] / "lowvram" / "ui" / "flags"
# (flavor, version) as each UI calls itself at start (modules/launch_utils.py "Version: …", minus git's suffix).
EXPECTED = {
    "forge": ("forge", "f2.0.1v1.10.1"),
    "forge-neo": ("forge-neo", "2.22"),
    "forge-classic": ("forge", "classic"),
    "reforge": ("reforge", "f1.0.0v2-v1.10.1RC"),
}
# Cards the flag lists were not written against (tests/fixtures/facts_matrix.py).
HELD_OUT = ("gt1030-2gb", "gtx1060-6gb", "rtx3050-laptop-4gb-win", "gtx1660s-6gb-win", "rtx4060ti-16gb", "no-gpu",
            "two-gpus")


def _doctor(cli, tmp_path: Path, root: Path, machine: str = "rtx3060-12gb") -> tuple[CliResult, dict]:  # type: ignore[no-untyped-def, type-arg]
    facts = write_facts(MACHINES[machine], tmp_path / f"{machine}.json")
    result = cli("doctor", "--json", "--facts", str(facts), "--webui", str(root))
    return result, json.loads(result.out)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_lineage_tree_is_told_apart_by_its_files(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    root = make_forge_lineage(tmp_path / "webui", kind)  # the same folder name for all four
    _, out = _doctor(cli, tmp_path, root)
    assert (out["webui"]["flavor"], out["webui"]["version"]) == EXPECTED[kind]


@pytest.mark.parametrize("kind", ["forge-neo", "reforge"])
def test_readme_title_names_neo_and_reforge_without_a_version_file(cli, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    root = make_forge_lineage(tmp_path / "webui", kind, version_file=False)
    _, out = _doctor(cli, tmp_path, root)
    assert out["webui"]["flavor"] == kind


def test_the_git_remote_is_the_last_hint(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = make_forge_lineage(tmp_path / "webui", "forge-neo", version_file=False, readme=False, remote=True)
    _, out = _doctor(cli, tmp_path, root)
    assert out["webui"]["flavor"] == "forge-neo"
    bare = make_forge_lineage(tmp_path / "bare", "forge-neo", version_file=False, readme=False)
    _, out = _doctor(cli, tmp_path, bare)
    assert out["webui"]["flavor"] == "forge"  # nothing says Neo: Forge, as before


def _flag_names(name: str) -> set[str]:
    """The flags in ui/flags/NAME, read here independently of lowvram's loader."""
    names: set[str] = set()
    for raw in (FLAGS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        names.update(line.split(":", 1)[1].split() if line.startswith("group ") else [line.split()[0]])
    return names


def _neo_facts(machine: str, family: str, flavor: str) -> Facts:
    facts = with_webui(MACHINES[machine], "forge", family)
    assert facts.webui is not None
    return replace(facts, webui=replace(facts.webui, flavor=flavor, version=None))


@pytest.mark.parametrize("ui,flag_file", [("forge-neo", "forge-neo.txt"), ("reforge", "reforge.txt")])
def test_plan_flags_are_the_uis_own_on_held_out_cards(cli, tmp_path: Path, ui: str, flag_file: str) -> None:  # type: ignore[no-untyped-def]
    real = _flag_names(flag_file)
    seen: set[str] = set()
    for machine in HELD_OUT:
        for family in ("sd15", "sdxl"):
            for extra in ((), ("--offload", "lowvram"), ("--offload", "medvram")):
                f = write_facts(_neo_facts(machine, family, ui), tmp_path / f"{machine}-{family}-{ui}.json")
                result = cli("plan", "--json", "--facts", str(f), *extra)
                assert result.code == 0, result.err
                out = json.loads(result.out)
                assert out["ui"] == ui
                flags = {a.split("=")[0] for a in out["args"] if a.startswith("-")}
                assert flags <= real, (machine, family, extra, flags - real)
                seen |= flags
    if ui == "forge-neo":  # Neo spells the levels ComfyUI's way; Forge's spellings would exit 2 there
        assert {"--lowvram", "--cpu"} <= seen
        assert not seen & {"--always-low-vram", "--always-cpu", "--attention-pytorch", "--vae-in-fp32"}
    else:
        assert "--always-low-vram" in seen


def test_reforge_uses_its_own_device_flag() -> None:
    from lowvram.ui import UiSettings, adapter

    args = adapter("reforge").render(UiSettings(offload="lowvram", device_index=1), None).args
    assert args == ("--always-low-vram", "--cuda-device", "1")
    adapter("reforge").validate(list(args), None)  # its own list has it; Forge's --gpu-device-id it lacks
    assert "--gpu-device-id" not in _flag_names("reforge.txt")


@pytest.mark.parametrize("ui", ["forge-neo", "reforge"])
def test_ui_choice_accepted_and_setup_refuses_in_one_line(cli, tmp_path: Path, ui: str) -> None:  # type: ignore[no-untyped-def]
    f = write_facts(MACHINES["rtx3060-12gb"], tmp_path / "m.json")
    result = cli("plan", "--json", "--facts", str(f), "--ui", ui, "--model", "sdxl")
    assert result.code == 0, result.err
    assert json.loads(result.out)["ui"] == ui
    result = cli("setup", "--ui", ui, "--dir", str(tmp_path / "new"))
    assert result.code == 2
    assert "cannot install" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "new").exists()


def test_neo_on_pascal_pins_a_cu126_torch(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    facts = _neo_facts("gtx1070-8gb", "sdxl", "forge-neo")
    assert facts.webui is not None
    facts = replace(facts, webui=replace(facts.webui, torch=None, torch_cuda=None))  # its first start installs torch
    out = json.loads(cli("plan", "--json", "--facts", str(write_facts(facts, tmp_path / "p.json"))).out)
    assert out["env"]["TORCH_COMMAND"] == ("pip install torch==2.11.0+cu126 torchvision==0.26.0+cu126 "
                                           "--index-url https://download.pytorch.org/whl/cu126")


def test_neo_doctor_fails_on_pascal_with_the_pip_fix(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = make_forge_lineage(tmp_path / "webui", "forge-neo", torch="2.11.0+cu130")
    result, out = _doctor(cli, tmp_path, root, "gtx1070-8gb")
    assert result.code == 1
    check = next(c for c in out["checks"] if c["status"] == "fail" and "no kernels" in c["message"])
    assert (f"{root}/venv/bin/python -m pip install torch==2.11.0+cu126 torchvision==0.26.0+cu126 "
            "--index-url https://download.pytorch.org/whl/cu126") in check["hint"]


def test_neo_refuses_fast_fp8_below_ada() -> None:
    from lowvram.ui import adapter
    from lowvram.ui.forge_neo import ForgeNeo

    neo = adapter("forge-neo")
    assert isinstance(neo, ForgeNeo)
    assert [f for f, _why in neo.card_refusals(["--fast-fp8", "--lowvram"], (8, 6))] == ["--fast-fp8"]
    assert neo.card_refusals(["--fast-fp8"], (8, 9)) == []
