"""The flags of the installed ComfyUI, read from its own `comfy/cli_args.py` as data (issue 19).

One shipped list for all ComfyUI versions passed flags through that the installed v0.3.64 lacks
(the UI exits 2) and refused flags it has. The tree's parser source is read with `ast` (never
imported or run); a source lowvram cannot read leaves the shipped list in charge, with a note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lowvram.world.detect.ui_flags import MAX_SOURCE_BYTES, read_ui_flags
from tests.fixtures.faults import GTX1650_LINUX
from tests.fixtures.webui_trees import make_webui

# The real shapes of comfy/cli_args.py at v0.3.64 (abridged), plus a deprecated alias, a flag this
# "version" has that lowvram's shipped list lacks (--default-device) and none of the shipped list's
# newer ones (--cache-ram, --vram-headroom, ...).
CLI_ARGS = '''
import argparse
import enum
import os
import comfy.options


class EnumAction(argparse.Action):
    def __init__(self, **kwargs):
        enum_type = kwargs.pop("type", None)
        super().__init__(**kwargs)


parser = argparse.ArgumentParser()

parser.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::")
parser.add_argument("--port", type=int, default=8188, help="Set the listen port.")
parser.add_argument("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs='+', action='append')
parser.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID")
parser.add_argument("--default-device", type=int, default=None, metavar="DEFAULT_DEVICE_ID")
cm_group = parser.add_mutually_exclusive_group()
cm_group.add_argument("--cuda-malloc", action="store_true")
cm_group.add_argument("--disable-cuda-malloc", action="store_true")

fpvae_group = parser.add_mutually_exclusive_group()
fpvae_group.add_argument("--fp16-vae", action="store_true")
fpvae_group.add_argument("--fp32-vae", action="store_true")
fpvae_group.add_argument("--bf16-vae", action="store_true")

class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"

parser.add_argument("--preview-method", type=LatentPreviewMethod, default=LatentPreviewMethod.NoPreviews, action=EnumAction)

attn_group = parser.add_mutually_exclusive_group()
attn_group.add_argument("--use-split-cross-attention", action="store_true")
attn_group.add_argument("--use-pytorch-cross-attention", action="store_true")

upcast = parser.add_mutually_exclusive_group()
upcast.add_argument("--force-upcast-attention", action="store_true")
upcast.add_argument("--dont-upcast-attention", action="store_true")

vram_group = parser.add_mutually_exclusive_group()
vram_group.add_argument("--gpu-only", action="store_true")
vram_group.add_argument("--highvram", action="store_true")
vram_group.add_argument("--normalvram", action="store_true")
vram_group.add_argument("--lowvram", action="store_true")
vram_group.add_argument("--novram", action="store_true")
vram_group.add_argument("--cpu", action="store_true")

parser.add_argument("--reserve-vram", type=float, default=None)
parser.add_argument("--fast", nargs="*", type=str)
parser.add_argument("--disable-smart-memory", "--dont-keep-models-loaded", action="store_true",
                    help="(--dont-keep-models-loaded is deprecated)")
parser.add_argument("--verbose", default='INFO', const='DEBUG', nargs="?",
                    choices=['DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'])

if comfy.options.args_parsing:
    args = parser.parse_args()
else:
    args = parser.parse_args([])
'''



@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "gtx1650.json"
    path.write_text(json.dumps(GTX1650_LINUX))
    return path


def comfy_tree(tmp_path: Path, source: str | bytes | None = CLI_ARGS) -> Path:
    root = make_webui(tmp_path / "ComfyUI", flavor="comfyui", version="0.3.64")
    if isinstance(source, bytes):
        (root / "comfy" / "cli_args.py").write_bytes(source)
    elif source is not None:
        (root / "comfy" / "cli_args.py").write_text(source, encoding="utf-8")
    return root


def plan_json(cli: Any, tree: Path, facts_file: Path, *more: str) -> dict[str, Any]:
    result = cli("plan", "--json", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl", *more)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


# ---- the reader -----------------------------------------------------------------------------


def test_reader_finds_every_flag_its_kind_and_the_exclusive_groups(tmp_path: Path) -> None:
    found = read_ui_flags(comfy_tree(tmp_path), "comfyui")
    assert found is not None and found.error is None and found.source == "comfy/cli_args.py"
    kinds = {name: (kind, choices) for name, kind, choices in found.flags}
    assert kinds["--lowvram"] == ("flag", ())
    assert kinds["--reserve-vram"] == ("value", ())  # type=float
    assert kinds["--listen"] == ("optvalue", ())  # nargs="?"
    assert kinds["--extra-model-paths-config"] == ("values", ())  # nargs='+', action='append'
    assert kinds["--fast"] == ("optvalues", ())  # nargs="*"
    assert kinds["--preview-method"] == ("value", ("none", "auto", "latent2rgb", "taesd"))  # an enum type
    assert kinds["--verbose"] == ("optvalue", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    assert kinds["--dont-keep-models-loaded"] == kinds["--disable-smart-memory"] == ("flag", ())  # the alias
    assert "--cache-ram" not in kinds and "--default-device" in kinds
    assert ("--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu") in found.groups
    assert ("--fp16-vae", "--fp32-vae", "--bf16-vae") in found.groups


def test_reader_never_imports_or_runs_the_source(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    source = CLI_ARGS + f"\nopen({str(marker)!r}, 'w').write('x')\nimport os; os.system('touch {marker}')\n"
    found = read_ui_flags(comfy_tree(tmp_path, source), "comfyui")
    assert found is not None and "--lowvram" in {f[0] for f in found.flags}
    assert not marker.exists()


@pytest.mark.parametrize(("source", "why"), [
    ("parser = argparse.ArgumentParser(\nparser.add_argument('--lowvram'", "does not parse"),
    (b"\x7fELF\x00\x00\x01binary", "binary"),
    (b"# \xff\xfe not utf-8\nparser.add_argument('--x')\n", "not UTF-8"),
    ("#" * (MAX_SOURCE_BYTES + 10), "bytes, over the"),
])
def test_damaged_source_falls_back_with_a_note(tmp_path: Path, source: str | bytes, why: str) -> None:
    found = read_ui_flags(comfy_tree(tmp_path, source), "comfyui")
    assert found is not None and found.flags == () and found.error is not None
    assert why in found.error and "comfy/cli_args.py" in found.error


def test_a_directory_or_fifo_in_place_of_the_source_falls_back(tmp_path: Path) -> None:
    root = comfy_tree(tmp_path, None)
    (root / "comfy" / "cli_args.py").mkdir()
    found = read_ui_flags(root, "comfyui")
    assert found is not None and found.error is not None and "not a regular file" in found.error
    if hasattr(os, "mkfifo"):
        (root / "comfy" / "cli_args.py").rmdir()
        os.mkfifo(root / "comfy" / "cli_args.py")
        found = read_ui_flags(root, "comfyui")  # must not block on the FIFO
        assert found is not None and found.error is not None and "not a regular file" in found.error


def test_no_source_reads_nothing(tmp_path: Path) -> None:
    assert read_ui_flags(comfy_tree(tmp_path, None), "comfyui") is None


# ---- what the user sees ---------------------------------------------------------------------


def test_a_flag_the_installed_version_has_is_accepted_after_dashdash(cli: Any, tmp_path: Path,
                                                                    facts_file: Path) -> None:
    tree = comfy_tree(tmp_path)
    result = cli("launch", "--dry-run", "--json", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl",
                 "--", "--default-device", "0")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["launch"]["argv"][-2:] == ["--default-device", "0"]
    assert data["extra"]["flags_checked_against"] == "ComfyUI 0.3.64 (comfy/cli_args.py)"


def test_a_flag_the_installed_version_lacks_is_one_error_line(cli: Any, tmp_path: Path, facts_file: Path) -> None:
    tree = comfy_tree(tmp_path)
    result = cli("launch", "--dry-run", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl",
                 "--", "--cache-ram", "4")
    assert result.code == 1
    assert "error: ComfyUI 0.3.64 has no flag --cache-ram" in result.err
    assert "Traceback" not in result.err and result.err.count("error:") == 1


def test_a_plan_flag_the_installed_version_lacks_is_left_out_with_a_note(cli: Any, tmp_path: Path,
                                                                        facts_file: Path) -> None:
    # This "version" has no --lowvram: the plan must not hand it to the UI (it would exit 2).
    source = CLI_ARGS.replace('vram_group.add_argument("--lowvram", action="store_true")\n', "")
    tree = comfy_tree(tmp_path, source)
    baseline = plan_json(cli, comfy_tree(tmp_path / "other"), facts_file, "--offload", "lowvram")
    assert "--lowvram" in baseline["args"]  # the shipped list has it, and the plan sets it
    data = plan_json(cli, tree, facts_file, "--offload", "lowvram")
    assert "--lowvram" not in data["args"]
    notes = [d["reason"] for d in data["decisions"] if d["setting"] == "flags"]
    assert any("left out: ComfyUI 0.3.64 has no --lowvram" in n for n in notes), notes


def test_a_damaged_source_plans_against_the_shipped_list_and_says_so(cli: Any, tmp_path: Path,
                                                                   facts_file: Path) -> None:
    tree = comfy_tree(tmp_path, b"\x00\x01binary")
    data = plan_json(cli, tree, facts_file)
    notes = [d["reason"] for d in data["decisions"] if d["setting"] == "flags"]
    assert any("could not be read" in n and "comfy/cli_args.py is binary" in n for n in notes), notes
    assert data["extra"]["flags_checked_against"] == "ComfyUI"
    result = cli("launch", "--dry-run", "--json", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl",
                 "--", "--cache-ram", "4")  # the shipped list has it
    assert result.code == 0, result.err


def test_doctor_json_carries_the_installed_flags_and_a_facts_file_reads_them_back(cli: Any, tmp_path: Path,
                                                                                  facts_file: Path) -> None:
    from lowvram.core.facts import facts_from_dict

    tree = comfy_tree(tmp_path)
    result = cli("doctor", "--json", "--webui", str(tree), "--facts", str(facts_file))
    facts = json.loads(result.out)["facts"] if "facts" in json.loads(result.out) else json.loads(result.out)
    flags = facts["webui"]["ui_flags"]
    assert flags["source"] == "comfy/cli_args.py" and flags["flags"]["--reserve-vram"] == "value"
    assert flags["flags"]["--verbose"] == "optvalue:DEBUG,INFO,WARNING,ERROR,CRITICAL"
    back = facts_from_dict(facts)
    assert back.webui is not None and back.webui.ui_flags is not None
    assert back.webui.ui_flags.flags == read_ui_flags(tree, "comfyui").flags  # type: ignore[union-attr]
    bad = dict(facts, webui=dict(facts["webui"], ui_flags={"flags": {"--x": "sometimes"}}))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = cli("plan", "--facts", str(path), "--ui", "comfyui", "--model", "sdxl")
    assert result.code == 1 and "webui.ui_flags.flags.--x" in result.err and "Traceback" not in result.err


def test_gtx16xx_gets_no_force_upcast_attention_on_comfyui(cli: Any, tmp_path: Path, facts_file: Path) -> None:
    """ComfyUI v0.3.64 keeps the 16 series out of fp16 compute by itself (should_use_fp16's list; checked with
    its own model_management on a GTX 1650's properties: fp16 weights, fp32 compute), so the flag changes
    nothing there; the UNet decision still says upcast, and the flags note says why there is no flag."""
    data = plan_json(cli, comfy_tree(tmp_path), facts_file)
    decided = {d["setting"]: d["value"] for d in data["decisions"]}
    assert decided["precision.unet"] == "upcast"
    assert "--force-upcast-attention" not in data["args"]
    notes = [d["reason"] for d in data["decisions"] if d["setting"] == "flags"]
    assert any("computes in fp32 on GTX 16xx" in n for n in notes), notes
