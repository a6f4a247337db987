"""lowvram against a real, running Forge on this machine's CPU (issue 19).

Behind LOWVRAM_E2E_FORGE (a `shared/tools/real-forge/build.sh` build); skipped with a reason without it.
Each test works on its own copy of the tree (`launch` writes its block into webui-user.sh).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from lowvram.world.detect.ui_flags import read_ui_flags
from tests.e2e.conftest import RealUi, free_port, kill_group, tail, txt2img, wait_http
from tests.fixtures.faults import GTX1650_LINUX

# What Forge needs to run on this machine's CPU, and its API on a free port.
CPU_AND_API = ("--always-cpu", "--skip-torch-cuda-test", "--skip-version-check", "--api", "--nowebui",
               "--server-name", "127.0.0.1")


def _launch(forge: RealUi, tmp_path: Path, *args: str, extra: tuple[str, ...]) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp_path / "launch.log"
    proc = forge.start([sys.executable, "-m", "lowvram", "launch", "--webui", str(forge.tree), *args, "--",
                        *extra, "--port", str(port)], log)
    return proc, port, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # Ctrl-C: lowvram forwards it to Forge's group
    try:
        proc.wait(timeout=90)
    finally:
        kill_group(proc)


def test_the_flags_read_from_the_tree_include_the_extensions(real_forge: RealUi) -> None:
    read = read_ui_flags(real_forge.tree, "forge")
    assert read is not None and read.error is None
    names = {name for name, _kind, _choices in read.flags}
    assert {"--always-low-vram", "--always-cpu", "--gpu-device-id", "--controlnet-loglevel"} <= names
    assert ("--always-gpu", "--always-high-vram", "--always-normal-vram", "--always-low-vram", "--always-no-vram",
            "--always-cpu") in read.groups


def test_the_users_always_cpu_after_dashdash_beats_the_plans_always_low_vram(real_forge: RealUi,
                                                                             tmp_path: Path) -> None:
    facts = tmp_path / "gtx1650.json"
    facts.write_text(json.dumps(GTX1650_LINUX))
    planned = json.loads(real_forge.lowvram("launch", "--dry-run", "--json", "--webui", str(real_forge.tree),
                                            "--facts", str(facts), "--offload", "lowvram").stdout)
    assert "--always-low-vram" in planned["args"]  # what would have met --always-cpu: Forge exited 2
    proc, port, log = _launch(real_forge, tmp_path, "--facts", str(facts), "--offload", "lowvram",
                              extra=CPU_AND_API)
    try:
        wait_http(port, "/sdapi/v1/sd-models", proc, log, timeout=400)
        text = log.read_text(errors="replace")
        assert "not allowed with argument" not in text
        assert "your --always-cpu (after --) contradicts the plan's --always-low-vram" in text
        assert txt2img(port)["images"], tail(log)
        assert "--always-low-vram" not in (real_forge.tree / "webui-user.sh").read_text()
    finally:
        _stop(proc)


def test_the_real_webui_sh_is_read_as_a1111s_launcher(real_forge: RealUi) -> None:
    """Forge keeps A1111's webui.sh (it sources webui-user.sh): its text says so, not the flavor."""
    from lowvram.world.detect.launcher import read_launcher

    launcher = read_launcher(real_forge.tree, "forge-neo")  # even named Neo, the file decides
    assert (launcher.style, launcher.decided_by, launcher.block_file) == ("a1111", "webui.sh", "webui-user.sh")
