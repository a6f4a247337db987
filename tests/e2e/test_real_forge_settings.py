"""Forge's memory settings against the real Forge on this machine's CPU (issue 19, items 1 and 2): what
`apply` writes into config.json is what Forge's own options API reads back, and `tune` sweeps them through
that API and leaves config.json byte for byte as it was.

Behind LOWVRAM_E2E_FORGE (a `shared/tools/real-forge/build.sh` build); skipped with a reason without it.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tests.e2e.conftest import RealUi, api, free_port, kill_group, wait_http
from tests.fixtures.faults import write_gtx1070_facts

CPU = "--always-cpu --skip-torch-cuda-test --skip-version-check"
# A config.json as Forge writes it (indent 4, not ASCII-escaped, no newline at the end), with the user's settings.
USER_CONFIG = {"samples_format": "png", "forge_preset": "xl", "forge_inference_memory": 1024,
               "forge_async_loading": "Queue", "ünïcode": "kept"}


def _prepare(forge: RealUi) -> tuple[Path, bytes]:
    """The user's webui-user.sh keeps Forge on this GPU-less CPU; the user's config.json."""
    user = forge.tree / "webui-user.sh"
    user.write_bytes(user.read_bytes() + f'export COMMANDLINE_ARGS="{CPU}"\n'.encode())
    config = json.dumps(USER_CONFIG, indent=4, ensure_ascii=False).encode()
    (forge.tree / "config.json").write_bytes(config)
    return write_gtx1070_facts(forge.tree.parent / "gtx1070.json"), config


def test_apply_writes_what_forges_options_api_reads_back(real_forge: RealUi, tmp_path: Path) -> None:
    facts, config = _prepare(real_forge)
    planned = json.loads(real_forge.lowvram("plan", "--webui", str(real_forge.tree), "--facts", str(facts),
                                            "--json").stdout)
    decided = {d["setting"]: d["value"] for d in planned["decisions"]}
    applied = real_forge.lowvram("apply", "--webui", str(real_forge.tree), "--facts", str(facts))
    assert applied.returncode == 0, applied.stderr
    port, log = free_port(), tmp_path / "forge.log"
    proc = real_forge.start(["bash", "webui.sh", "-f", "--api", "--nowebui", "--server-name", "127.0.0.1", "--port",
                             str(port)], log)
    try:
        wait_http(port, "/sdapi/v1/options", proc, log, timeout=400)
        options = api(port, "/sdapi/v1/options")
        # Forge reads lowvram's keys from config.json (in API-only mode they are stored, not yet live: the
        # browser page applies them at its first load, or a POST to /sdapi/v1/options does).
        assert options["forge_inference_memory"] == decided["forge_inference_memory"]
        assert (planned["model_family"] == "sd15" and "xl_GPU_MB" not in json.loads(
            (real_forge.tree / "config.json").read_text())) or options["xl_GPU_MB"] == decided["forge.gpu_weights_mb"]
        assert options["samples_format"] == "png"  # (the options API serves only the options Forge knows)
    finally:
        kill_group(proc, signal.SIGINT)  # Forge stops on SIGINT; the whole group, webui.sh leads it
        try:
            proc.wait(timeout=60)
        finally:
            kill_group(proc)
    reverted = real_forge.lowvram("revert", "--webui", str(real_forge.tree))
    assert reverted.returncode == 0, reverted.stderr
    after = json.loads((real_forge.tree / "config.json").read_text())
    assert {k: after.get(k) for k in USER_CONFIG} == USER_CONFIG and "xl_GPU_MB" not in after
    if after == USER_CONFIG:  # Forge did not rewrite it at start: revert put back the very bytes
        assert (real_forge.tree / "config.json").read_bytes() == config


def test_tune_sweeps_forge_through_its_api_and_leaves_config_json_as_it_was(real_forge: RealUi,
                                                                             tmp_path: Path) -> None:
    facts, config = _prepare(real_forge)
    user = (real_forge.tree / "webui-user.sh").read_bytes()
    out = tmp_path / "tune.json"
    proc = real_forge.start([sys.executable, "-m", "lowvram", "tune", "--webui", str(real_forge.tree), "--facts",
                             str(facts), "--width", "64", "--height", "64", "--steps", "2",
                             "--repeats", "1", "--max-candidates", "3", "--max-minutes", "8", "--json"], out)
    try:
        code = proc.wait(timeout=590)
    finally:
        kill_group(proc)
    text = out.read_text(errors="replace")
    assert code == 0, text[-3000:]
    result = json.loads(text[text.index("{"):])
    assert result["roads"] == ["forge"] and len(result["probes"]) == 3, result
    assert result["best"] is not None and result["best"]["forge_async_loading"] in ("Queue", "Async")
    assert (real_forge.tree / "config.json").read_bytes() == config
    assert (real_forge.tree / "webui-user.sh").read_bytes() == user
