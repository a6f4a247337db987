"""Every flag a plan gives, parsed by the real UI's own argument parser (issue 19's check: "each UI's own
parser for every flag on a held-out set of cards").

The cards are held out: none of them is in tests/fixtures/facts_matrix.py, whose machines the policy and the
goldens were written against (four matrix machines join them for the flag kinds held-out single-NVIDIA
cards never get: CPU mode, an AMD-only box, two GPUs, a GTX 16xx). For each card, each offload level and the families each UI runs, `plan --json`
runs in-process on the real tree (so the flags are checked against what lowvram read from that tree) and,
for the DiT families A1111 and Forge trees here cannot hold, without a tree (`--ui`, lowvram's shipped list).
Then one run of the UI's own Python imports the UI's parser (A1111's and Forge's modules/cmd_args.py, ComfyUI's
comfy/cli_args.py; nothing else of the UI starts) and parses every plan's flags: none may be unknown to it,
and none may make it exit.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lowvram.core.facts import Facts, GpuFacts, SystemFacts, TcmallocFacts, derive_sysmem_fallback
from tests.conftest import CliResult
from tests.e2e.conftest import RealA1111, RealUi
from tests.fixtures.facts_matrix import MACHINES, write_facts

# name, VRAM (MiB as NVML reports it), compute capability, CUDA cores, max SM clock, PCIe gen/width max, OS
HELD_OUT_CARDS = [
    ("NVIDIA GeForce GTX 960", 4096, "5.2", 1024, 1392, 3, 16, "linux"),
    ("Quadro P2000", 5120, "6.1", 1024, 1721, 3, 16, "windows"),
    ("NVIDIA GeForce GTX 1080 Ti", 11264, "6.1", 3584, 1911, 3, 16, "linux"),
    ("NVIDIA GeForce MX450", 2048, "7.5", 896, 1575, 4, 4, "windows"),
    ("NVIDIA GeForce GTX 1660 Ti", 6144, "7.5", 1536, 2100, 3, 16, "windows"),
    ("NVIDIA GeForce RTX 2070 SUPER", 8192, "7.5", 2560, 2100, 3, 16, "linux"),
    ("Tesla T4", 15360, "7.5", 2560, 1590, 3, 16, "linux"),
    ("NVIDIA RTX A2000", 6138, "8.6", 3328, 2100, 4, 16, "linux"),
    ("NVIDIA GeForce RTX 3070 Laptop GPU", 8192, "8.6", 5120, 2100, 4, 16, "windows"),
    ("NVIDIA GeForce RTX 4070", 12282, "8.9", 5888, 3105, 4, 16, "linux"),
    ("NVIDIA GeForce RTX 5060 Ti", 16311, "12.0", 4608, 3090, 5, 8, "windows"),
]
# Beside them, the matrix's machines that give the other kinds of flag: a device index, CPU mode, a GTX 16xx.
FLAG_KIND_MACHINES = ("two-gpus", "no-gpu", "amd-only", "gtx1650-4gb")
OFFLOADS: list[tuple[str, ...]] = [(), ("--offload", "none"), ("--offload", "medvram-sdxl"), ("--offload", "medvram"),
                                   ("--offload", "lowvram")]

# A small harness of lowvram's own, run by the UI's Python: it imports the UI's parser and parses each case.
PARSE = r'''
import contextlib, io, json, os, sys
kind, tree = sys.argv[1], sys.argv[2]
cases = json.load(sys.stdin)
sys.path.insert(0, tree)
os.chdir(tree)
sys.argv = [sys.argv[0]]
if kind == "comfyui":
    import comfy.options  # noqa: F401 - argument parsing stays off: the import parses no arguments
    from comfy.cli_args import parser
else:
    from modules.cmd_args import parser
out = []
for args in cases:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _, rest = parser.parse_known_args(args)
        out.append("unknown to it: " + " ".join(rest) if rest else None)
    except SystemExit:
        out.append((err.getvalue().strip().splitlines() or ["exit"])[-1])
print(json.dumps(out))
'''


def _facts(tmp_path: Path) -> list[Path]:
    files = []
    for i, (name, total, cc, cores, clock, gen, width, os_name) in enumerate(HELD_OUT_CARDS):
        driver = "560.94" if os_name == "windows" else "550.54"
        system = SystemFacts(os=os_name, os_version="10.0.22631" if os_name == "windows" else "6.8", arch="x86_64",
                             ram_mb=32768, swap_mb=4096, glibc=None if os_name == "windows" else "2.39",
                             sysmem_fallback=derive_sysmem_fallback(os_name, driver, False))
        gpu = GpuFacts(index=0, uuid=f"GPU-held-out-{i}", name=name, vram_total_mb=total, vram_free_mb=total - 400,
                       vram_used_mb=400, driver=driver, cuda_driver="12.4", compute_capability=cc, pcie_gen=gen,
                       pcie_width=width, cuda_cores=cores, sm_clock_max_mhz=clock, pcie_gen_max=gen,
                       pcie_width_max=width)
        tcmalloc = TcmallocFacts(library=None, usable=False, reason="not found")
        facts = Facts(system=system, gpus=(gpu,), tcmalloc=tcmalloc, webui=None)
        files.append(write_facts(facts, tmp_path / f"card{i}.json"))
    return files + [write_facts(MACHINES[name], tmp_path / f"{name}.json") for name in FLAG_KIND_MACHINES]


def _plans(cli: Any, facts_files: list[Path], where: tuple[str, ...], models: list[tuple[str, ...]]) -> list[
        tuple[str, list[str]]]:
    cases = []
    for facts in facts_files:
        for model in models:
            for offload in OFFLOADS:
                args = ("plan", "--json", "--facts", str(facts), *where, *model, *offload)
                result: CliResult = cli(*args)
                assert result.code == 0, (args, result.err)
                cases.append((" ".join(args[4:]) + f" [{facts.stem}]", list(json.loads(result.out)["args"])))
    return cases


def _parse(kind: str, tree: Path, env: dict[str, str], cases: list[tuple[str, list[str]]]) -> None:
    done = subprocess.run([str(tree / "venv" / "bin" / "python"), "-c", PARSE, kind, str(tree)], cwd=tree, env=env,
                          input=json.dumps([args for _, args in cases]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    refused = [(case, args, why) for (case, args), why in zip(cases, verdicts, strict=True) if why]
    assert not refused, refused[:10]
    assert any(args for _, args in cases)  # the plans gave flags to check, not only empty lists


def test_a1111s_own_parser_takes_every_plans_flags(real_a1111: RealA1111, cli: Any, tmp_path: Path) -> None:
    files = _facts(tmp_path)
    cases = _plans(cli, files, ("--webui", str(real_a1111.tree)), [()])
    cases += _plans(cli, files, ("--ui", "a1111"), [("--model", "sdxl"), ("--model", "sd15")])
    _parse("a1111", real_a1111.tree, real_a1111.env, cases)


def test_forges_own_parser_takes_every_plans_flags(real_forge: RealUi, cli: Any, tmp_path: Path) -> None:
    files = _facts(tmp_path)
    cases = _plans(cli, files, ("--webui", str(real_forge.tree)), [()])
    cases += _plans(cli, files, ("--ui", "forge"), [("--model", "sdxl"), ("--model", "flux1-dev"),
                                                    ("--model", "sd3.5-large")])
    _parse("forge", real_forge.tree, real_forge.env, cases)


def test_comfyuis_own_parser_takes_every_plans_flags(real_comfy: RealUi, cli: Any, tmp_path: Path) -> None:
    files = _facts(tmp_path)
    models = [("--model", m) for m in ("sd15", "sdxl", "flux1-dev", "sd3.5-large")]
    cases = _plans(cli, files, ("--webui", str(real_comfy.tree)), models)
    _parse("comfyui", real_comfy.tree, real_comfy.env, cases)


@pytest.mark.parametrize("bad", [["--always-low-vram", "--no-such-flag"], ["--cuda-device", "x"]])
def test_the_harness_reports_what_a_real_parser_refuses(real_comfy: RealUi, bad: list[str]) -> None:
    """The check can fail: an unknown flag, or a value the real parser rejects, is reported."""
    with pytest.raises(AssertionError, match=r"unknown to it|invalid"):
        _parse("comfyui", real_comfy.tree, real_comfy.env, [("bad", bad)])
