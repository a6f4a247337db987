"""`lowvram tune` against the real ComfyUI v0.3.64 on this machine's CPU (issue 19 item 3), behind
LOWVRAM_E2E_COMFY: the GTX 1070's facts stand for the GPU, `-- --cpu` keeps the real ComfyUI on the CPU;
two candidates at 64×64, 2 steps. Afterwards the tree is as it was and no ComfyUI process is left."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tests.e2e.conftest import RealUi
from tests.fixtures.api_ui import pid_alive
from tests.fixtures.faults import write_gtx1070_facts


def _state(tree: Path) -> dict[str, str]:
    """Every entry ComfyUI may write (user/, temp/, output/, input/ and the top level), files by digest."""
    out = {p.name: "entry" for p in tree.iterdir()}
    for name in ("user", "temp", "output", "input"):
        for path in sorted((tree / name).rglob("*")) if (tree / name).is_dir() else []:
            rel = path.relative_to(tree).as_posix()
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def test_tune_on_the_real_comfyui_leaves_the_tree_as_it_was(real_comfy: RealUi, tmp_path: Path) -> None:
    facts = write_gtx1070_facts(tmp_path / "gtx1070.json")
    before = _state(real_comfy.tree)
    # Two candidates: no flag, and --reserve-vram 0.2 (the sweep cut short for the CPU's pace).
    script = tmp_path / "tune2.py"
    script.write_text(
        "import sys\nfrom lowvram.world.tune import comfy\n"
        "comfy.RESERVES_GB = (None, 0.2)\n"
        "from lowvram.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = real_comfy.start([sys.executable, str(script), "tune", "--webui", str(real_comfy.tree), "--facts",
                             str(facts), "--width", "64", "--height", "64", "--steps", "2", "--repeats", "1",
                             "--max-minutes", "8", "--json", "--", "--cpu"], tmp_path / "tune.json")
    code = done.wait(timeout=600)
    out = (tmp_path / "tune.json").read_text()
    assert code == 0, out[-3000:]
    result = json.loads(out[out.index("{"):])
    assert [p["reserve_vram_mb"] for p in result["probes"]] == [None, 204], result["probes"]
    assert all(p["ok"] for p in result["probes"]), result["probes"]
    assert result["best"] is not None
    assert _state(real_comfy.tree) == before
    # No ComfyUI left: no live process runs main.py in the tree.
    tree = real_comfy.tree.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd, cmd = Path(os.readlink(entry / "cwd")), (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        assert not (cwd == tree and b"main.py" in cmd and pid_alive(int(entry.name))), cmd
