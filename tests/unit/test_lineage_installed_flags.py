"""The flags of an installed Forge Neo or reForge, read from the tree's own parser files as data (issue 19
item 4): Neo's backend/args.py (ComfyUI's cli_args port), modules/paths_internal.py (where Neo's parser gets
--data-dir) and modules/cmd_args.py; reForge's ldm_patched/modules/args_parser.py and modules/cmd_args.py; the
extensions' preload.py for both. The shipped lists (ui/flags/forge-neo.txt, reforge.txt) stay the fallback.

The parser files below are small ones in the real files' shapes (argparse groups, an Enum action, a parser
handed from one module to the next), not copies of upstream code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowvram.world.detect.ui_flags import read_ui_flags
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_forge_lineage

NEO_ARGS = '''
import argparse
import enum


class EnumAction(argparse.Action):
    def __init__(self, **kwargs):
        enum_type = kwargs.pop("type", None)
        kwargs.setdefault("choices", tuple(e.value for e in enum_type))
        super().__init__(**kwargs)


parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--gpu-device-id", type=int, default=None, metavar="DEVICE_ID")

fpvae_group = parser.add_mutually_exclusive_group()
fpvae_group.add_argument("--fp32-vae", action="store_true")
fpvae_group.add_argument("--bf16-vae", action="store_true")

parser.add_argument("--use-pytorch-cross-attention", action="store_true")
parser.add_argument("--xformers", action="store_true", help="install xformers")

vram_group = parser.add_mutually_exclusive_group()
vram_group.add_argument("--highvram", action="store_true")
vram_group.add_argument("--lowvram", action="store_true")
vram_group.add_argument("--novram", action="store_true")
vram_group.add_argument("--cpu", action="store_true")

parser.add_argument("--reserve-vram", type=float, default=None, metavar="GB")
parser.add_argument("--cuda-stream", type=int, nargs="?", metavar="NUM_STREAMS", const=2)
parser.add_argument("--fast-fp8", action="store_true", help="torch._scaled_mm")
parser.add_argument("--offload-cache-mb", type=int, default=0, help="a flag this Neo has and lowvram's list lacks")


class SageAttentionFuncs(enum.Enum):
    auto = "auto"
    fp16_cuda = "fp16_cuda"


sage = parser.add_argument_group(description="SageAttention")
sage.add_argument("--sage-function", type=SageAttentionFuncs, default=SageAttentionFuncs.auto, action=EnumAction)

args, _ = parser.parse_known_args()
'''

NEO_PATHS_INTERNAL = '''
import os
from backend.args import parser

parser.add_argument("--data-dir", type=str, default=os.path.dirname(__file__))
parser.add_argument("--model-ref", type=str, default=None)
cmd_opts_pre, _ = parser.parse_known_args()
'''

NEO_CMD_ARGS = '''
import argparse
from modules.paths_internal import data_path, parser

parser.add_argument("-f", action="store_true", help=argparse.SUPPRESS)
parser.add_argument("--skip-torch-cuda-test", action="store_true")
parser.add_argument("--port", type=int, default=None)
parser.add_argument("--ckpt-dirs", type=str, action="append", default=[])

pkm = parser.add_mutually_exclusive_group()
pkm.add_argument("--uv", action="store_true")
pkm.add_argument("--uv-symlink", action="store_true")
'''

REFORGE_ARGS_PARSER = '''
import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID")

fpvae_group = parser.add_mutually_exclusive_group()
fpvae_group.add_argument("--vae-in-fp16", action="store_true")
fpvae_group.add_argument("--vae-in-fp32", action="store_true")

attn_group = parser.add_mutually_exclusive_group()
attn_group.add_argument("--attention-split", action="store_true")
attn_group.add_argument("--attention-pytorch", action="store_true")

vram_group = parser.add_mutually_exclusive_group()
vram_group.add_argument("--always-gpu", action="store_true")
vram_group.add_argument("--always-low-vram", action="store_true")
vram_group.add_argument("--always-no-vram", action="store_true")
vram_group.add_argument("--always-cpu", type=int, nargs="?", metavar="CPU_NUM_THREADS", const=-1)
'''

REFORGE_CMD_ARGS = '''
import argparse
from ldm_patched.modules import args_parser

parser = args_parser.parser
parser.add_argument("-f", action="store_true", help=argparse.SUPPRESS)
parser.add_argument("--skip-torch-cuda-test", action="store_true")
parser.add_argument("--data-dir", type=str, default=".")
parser.add_argument(
    "--controlnet-dir",
    type=str,
    default=None,
)
'''

PRELOAD = '''
def preload(parser):
    parser.add_argument("--controlnet-loglevel", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
'''


def neo_tree(root: Path, *, args: str = NEO_ARGS, paths_internal: bool = True) -> Path:
    make_forge_lineage(root, "forge-neo")
    (root / "backend" / "args.py").write_text(args)
    if paths_internal:
        (root / "modules" / "paths_internal.py").write_text(NEO_PATHS_INTERNAL)
    (root / "modules" / "cmd_args.py").write_text(NEO_CMD_ARGS)
    (root / "extensions-builtin" / "sd_forge_controlnet").mkdir(parents=True)
    (root / "extensions-builtin" / "sd_forge_controlnet" / "preload.py").write_text(PRELOAD)
    return root


def reforge_tree(root: Path, *, args_parser: str = REFORGE_ARGS_PARSER) -> Path:
    make_forge_lineage(root, "reforge")
    (root / "ldm_patched" / "modules" / "args_parser.py").write_text(args_parser)
    (root / "modules" / "cmd_args.py").write_text(REFORGE_CMD_ARGS)
    (root / "extensions" / "sd-webui-controlnet").mkdir(parents=True)
    (root / "extensions" / "sd-webui-controlnet" / "preload.py").write_text(PRELOAD)
    return root


def _plan(cli: Any, tmp_path: Path, tree: Path, *more: str, machine: str = "rtx3060-12gb") -> dict[str, Any]:
    facts = write_facts(MACHINES[machine], tmp_path / f"{machine}.json")
    result = cli("plan", "--json", "--webui", str(tree), "--facts", str(facts), "--model", "sdxl", *more)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def _flag_notes(data: dict[str, Any]) -> list[str]:
    return [d["reason"] for d in data["decisions"] if d["setting"] == "flags"]


# ---- the reader -----------------------------------------------------------------------------


def test_neo_flags_are_read_from_its_three_parser_files_and_the_preloads(tmp_path: Path) -> None:
    read = read_ui_flags(neo_tree(tmp_path / "webui"), "forge-neo")
    assert read is not None and read.error is None
    assert read.source == "backend/args.py, modules/cmd_args.py, modules/paths_internal.py"
    flags = {name: (kind, choices) for name, kind, choices in read.flags}
    assert flags["--fast-fp8"] == ("flag", ())
    assert flags["--reserve-vram"] == ("value", ())
    assert flags["--cuda-stream"] == ("optvalue", ())
    assert flags["--sage-function"] == ("value", ("auto", "fp16_cuda"))  # the Enum action's values
    assert flags["--data-dir"] == ("value", ())  # modules/paths_internal.py
    assert flags["--uv"] == ("flag", ())  # modules/cmd_args.py
    assert flags["--controlnet-loglevel"] == ("value", ("DEBUG", "INFO", "WARNING"))  # an extension's preload.py
    assert ("--highvram", "--lowvram", "--novram", "--cpu") in read.groups
    assert ("--uv", "--uv-symlink") in read.groups


def test_neo_without_paths_internal_still_reads_the_two_parsers(tmp_path: Path) -> None:
    read = read_ui_flags(neo_tree(tmp_path / "webui", paths_internal=False), "forge-neo")
    assert read is not None and read.source == "backend/args.py, modules/cmd_args.py"
    assert "--fast-fp8" in {name for name, _, _ in read.flags}


def test_reforge_flags_are_read_from_ldm_patched_cmd_args_and_the_preloads(tmp_path: Path) -> None:
    read = read_ui_flags(reforge_tree(tmp_path / "webui"), "reforge")
    assert read is not None and read.error is None
    assert read.source == "ldm_patched/modules/args_parser.py, modules/cmd_args.py"
    flags = {name: (kind, choices) for name, kind, choices in read.flags}
    assert flags["--always-low-vram"] == ("flag", ())
    assert flags["--always-cpu"] == ("optvalue", ())
    assert flags["--cuda-device"] == ("value", ())
    assert flags["--controlnet-dir"] == ("value", ())
    assert "--controlnet-loglevel" in flags
    assert ("--always-gpu", "--always-low-vram", "--always-no-vram", "--always-cpu") in read.groups


def test_a_stand_in_parser_keeps_the_shipped_list(tmp_path: Path) -> None:
    # make_forge_lineage's files define no flag: the shipped list, silently (as for Forge and ComfyUI)
    assert read_ui_flags(make_forge_lineage(tmp_path / "neo", "forge-neo"), "forge-neo") is None
    assert read_ui_flags(make_forge_lineage(tmp_path / "re", "reforge"), "reforge") is None


# ---- what the user sees ---------------------------------------------------------------------


def test_doctor_shows_neo_and_reforge_installed_flags(cli: Any, tmp_path: Path) -> None:
    facts = write_facts(MACHINES["rtx3060-12gb"], tmp_path / "m.json")
    for tree, flavor, flag in ((neo_tree(tmp_path / "neo"), "forge-neo", "--offload-cache-mb"),
                               (reforge_tree(tmp_path / "re"), "reforge", "--always-low-vram")):
        out = json.loads(cli("doctor", "--json", "--webui", str(tree), "--facts", str(facts)).out)
        assert out["webui"]["flavor"] == flavor
        assert flag in out["webui"]["ui_flags"]["flags"]


def test_a_neo_plan_is_checked_against_its_own_parser(cli: Any, tmp_path: Path) -> None:
    data = _plan(cli, tmp_path, neo_tree(tmp_path / "webui"), "--offload", "lowvram")
    assert data["ui"] == "forge-neo" and "--lowvram" in data["args"]
    assert data["extra"]["flags_checked_against"] == (
        "Forge Neo 2.22 (backend/args.py, modules/cmd_args.py, modules/paths_internal.py)")


def test_a_plan_flag_the_installed_neo_lacks_is_left_out_with_a_note(cli: Any, tmp_path: Path) -> None:
    # This Neo has no --lowvram (the shipped list has it): the UI would exit 2 on it.
    source = NEO_ARGS.replace('vram_group.add_argument("--lowvram", action="store_true")\n', "")
    data = _plan(cli, tmp_path, neo_tree(tmp_path / "webui", args=source), "--offload", "lowvram")
    assert "--lowvram" not in data["args"]
    assert any("--lowvram left out: Forge Neo 2.22 has no --lowvram" in n for n in _flag_notes(data)), _flag_notes(data)


def test_a_plan_flag_the_installed_reforge_lacks_is_left_out_with_a_note(cli: Any, tmp_path: Path) -> None:
    source = REFORGE_ARGS_PARSER.replace('vram_group.add_argument("--always-low-vram", action="store_true")\n', "")
    data = _plan(cli, tmp_path, reforge_tree(tmp_path / "webui", args_parser=source), "--offload", "lowvram")
    assert data["ui"] == "reforge"
    assert "--always-low-vram" not in data["args"]
    assert any("--always-low-vram left out" in n and "ldm_patched/modules/args_parser.py" in n
               for n in _flag_notes(data)), _flag_notes(data)


def test_a_flag_only_the_installed_neo_has_is_accepted_after_dashdash(cli: Any, tmp_path: Path) -> None:
    tree = neo_tree(tmp_path / "webui")
    facts = write_facts(MACHINES["rtx3060-12gb"], tmp_path / "m.json")
    result = cli("launch", "--dry-run", "--json", "--webui", str(tree), "--facts", str(facts), "--model", "sdxl",
                 "--", "--offload-cache-mb", "512")
    assert result.code == 0, result.err
    assert json.loads(result.out)["launch"]["argv"][-2:] == ["--offload-cache-mb", "512"]
    result = cli("launch", "--dry-run", "--webui", str(tree), "--facts", str(facts), "--model", "sdxl",
                 "--", "--always-low-vram")  # Forge's spelling: this Neo's parser has no such flag
    assert result.code == 1
    assert "Forge Neo 2.22 has no flag --always-low-vram" in result.err
    assert "Traceback" not in result.err and result.err.count("error:") == 1


def test_a_damaged_neo_parser_plans_against_the_shipped_list_and_says_so(cli: Any, tmp_path: Path) -> None:
    tree = neo_tree(tmp_path / "webui")
    (tree / "modules" / "cmd_args.py").write_bytes(b"\x00\x01binary")
    data = _plan(cli, tmp_path, tree)
    assert any("could not be read" in n and "modules/cmd_args.py is binary" in n for n in _flag_notes(data))
    assert data["extra"]["flags_checked_against"] == "Forge Neo"  # lowvram's shipped list
