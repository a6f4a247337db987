"""lowvram against a real, running ComfyUI v0.3.64 on this machine's CPU (issue 19).

Behind LOWVRAM_E2E_COMFY (a `shared/tools/real-comfy/build.sh` build); skipped with a reason without it.
What a user would see: the flags lowvram reads from the tree match what ComfyUI's own --help lists, a
`lowvram launch` with the plan's flags reaches the API and generates once, and a clash between the
plan's --lowvram and the user's --cpu after `--` no longer makes ComfyUI exit 2.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lowvram.world.detect.ui_flags import read_ui_flags
from tests.e2e.conftest import RealUi, api, free_port, kill_group, tail, wait_http
from tests.fixtures.faults import GTX1650_LINUX


def _help_options(text: str) -> set[str]:
    """The option strings argparse's --help lists under `options:`."""
    found: set[str] = set()
    for line in text.split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            for part in stripped.split("  ")[0].split(", "):
                found.add(part.split()[0].split("=")[0])
    return found


def test_the_flags_read_from_the_tree_are_the_ones_its_help_lists(real_comfy: RealUi) -> None:
    done = subprocess.run([str(real_comfy.tree / "venv" / "bin" / "python"), "main.py", "--help"], cwd=real_comfy.tree,
                          env=real_comfy.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    helped = _help_options(done.stdout) - {"-h", "--help"}  # argparse's own
    read = read_ui_flags(real_comfy.tree, "comfyui")
    assert read is not None and read.error is None
    assert {name for name, _kind, _choices in read.flags} == helped
    for name, kind, _choices in read.flags:  # "--x X" / "--x [X]" / "--x X [X ...]" in the help
        usage = re.search(r"(?m)^\s*(?:-\S+, )*" + re.escape(name) + r"(?=[ ,\n=])(?:[ =]([\[{A-Z_0-9]\S*))?",
                          done.stdout.split("options:", 1)[1])
        assert usage is not None, name
        assert (kind == "flag") == (usage.group(1) is None), (name, kind, usage.group(0))


def _workflow(ckpt: str) -> dict[str, Any]:
    """shared/tools/real-comfy/gen.py's workflow: 64×64, 2 steps, one image."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "lowvram-e2e"}},
    }


def _generate_once(port: int) -> list[Any]:
    queued = api(port, "/prompt", {"prompt": _workflow("random-sd15.safetensors"), "client_id": "lowvram-e2e"})
    pid = queued["prompt_id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        history = api(port, f"/history/{pid}")
        if pid in history:
            status = history[pid].get("status", {})
            assert status.get("status_str") == "success", json.dumps(status)[:2000]
            return [i for o in history[pid].get("outputs", {}).values() for i in o.get("images", [])]
        time.sleep(0.5)
    raise AssertionError("no result from /history within 600 s")


def _launch(real_comfy: RealUi, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp_path / "launch.log"
    proc = real_comfy.start([sys.executable, "-m", "lowvram", "launch", "--webui", str(real_comfy.tree), *args,
                             "--", "--listen", "127.0.0.1", "--port", str(port)] if "--" not in args else
                            [sys.executable, "-m", "lowvram", "launch", "--webui", str(real_comfy.tree), *args,
                             "--listen", "127.0.0.1", "--port", str(port)], log)
    return proc, port, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to lowvram: it forwards it to ComfyUI's group (ComfyUI has no SIGINT handler)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        kill_group(proc)


def test_launch_with_the_plans_flags_reaches_the_api_and_generates(real_comfy: RealUi, tmp_path: Path) -> None:
    plan = json.loads(real_comfy.lowvram("plan", "--json", "--webui", str(real_comfy.tree)).stdout)
    assert plan["extra"]["flags_checked_against"] == "ComfyUI 0.3.64 (comfy/cli_args.py)"
    # No --model: the plan reads the model file in ComfyUI's models/checkpoints (issue 19's first finding).
    model = next(d for d in plan["decisions"] if d["setting"] == "model")
    assert model["value"] == "sd15" and "random-sd15.safetensors" in model["reason"], model
    proc, port, log = _launch(real_comfy, tmp_path)
    try:
        wait_http(port, "/system_stats", proc, log)
        assert _generate_once(port), tail(log)
        text = log.read_text(errors="replace")
        assert f"main.py {' '.join(plan['args'])}".strip() in text  # the plan's flags reached main.py
    finally:
        _stop(proc)


def test_the_users_cpu_after_dashdash_beats_the_plans_lowvram(real_comfy: RealUi, tmp_path: Path) -> None:
    facts = tmp_path / "gtx1650.json"
    facts.write_text(json.dumps(GTX1650_LINUX))
    planned = json.loads(real_comfy.lowvram("launch", "--dry-run", "--json", "--webui", str(real_comfy.tree),
                                            "--facts", str(facts), "--offload", "lowvram").stdout)
    assert "--lowvram" in planned["args"]  # what would have met --cpu on ComfyUI's command line
    proc, port, log = _launch(real_comfy, tmp_path, "--facts", str(facts), "--offload", "lowvram", "--", "--cpu")
    try:
        wait_http(port, "/system_stats", proc, log)  # before: "argument --cpu: not allowed with argument --lowvram"
        text = log.read_text(errors="replace")
        assert "not allowed with argument" not in text
        assert "your --cpu (after --) contradicts the plan's --lowvram" in text
        assert _generate_once(port), tail(log)
    finally:
        _stop(proc)
