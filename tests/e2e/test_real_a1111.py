"""lowvram's real commands against a real, running AUTOMATIC1111 v1.8.0 (issue 13 §2).

Every test asserts what a user would see: the doctor's lines, A1111's own extension API, the
observation a real txt2img leaves, the processes left after Ctrl-C, the bytes of webui-user.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.e2e.conftest import (
    CPU_ARGS,
    Tree,
    api,
    api_args,
    free_port,
    kill_group,
    read_observations,
    tail,
    txt2img,
    wait_api,
)
from tests.fixtures.faults import install_noext_profile, write_gtx1070_facts


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start_webui_sh(tree: Tree, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The user's way: `bash webui.sh` (with -f: this machine runs as root)."""
    proc = tree.start(["bash", "webui.sh", "-f", *api_args(port), *extra], log)
    wait_api(port, proc, log)
    return proc


def _start_launch(tree: Tree, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`lowvram launch -- --api …` in its own process group, once the UI answers."""
    proc = tree.start([sys.executable, "-m", "lowvram", "launch", "--webui", str(tree.path), "--",
                       *api_args(port)], log)
    wait_api(port, proc, log)
    return proc


def _group_pids(root_pid: int) -> set[int]:
    try:
        parent = psutil.Process(root_pid)
        return {root_pid} | {c.pid for c in parent.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_doctor_names_the_real_tree(a1111: Tree) -> None:
    done = a1111.lowvram("doctor", "--webui", str(a1111.path))
    out = done.stdout
    assert f"a1111, 1.8.0, {a1111.path}" in out, out
    assert "torch 2.14.1" in out, out
    assert "model sd15" in out, out
    assert "webui.checkpoint     random-sd15.safetensors: SD 1.5" in out, out


def test_the_real_webui_sh_is_read_as_a1111s_launcher(a1111: Tree) -> None:
    from lowvram.world.detect.launcher import read_launcher

    launcher = read_launcher(a1111.path, "forge-neo")  # even named Neo, the file decides
    assert (launcher.style, launcher.decided_by, launcher.block_file) == ("a1111", "webui.sh", "webui-user.sh")


def test_installed_extensions_show_in_a1111s_own_api(a1111: Tree) -> None:
    real = a1111.real
    done = a1111.lowvram("install-extensions", "--webui", str(a1111.path),
                         "--source", f"vram-estimator={real.extension_clone('vram-estimator')}",
                         "--source", f"giant-kitten={real.extension_clone('giant-kitten')}")
    assert done.returncode == 0, done.stdout + done.stderr
    port, log = free_port(), a1111.path.parent / "ui.log"
    _start_webui_sh(a1111, port, log, *CPU_ARGS)
    listed = {e["name"]: e for e in api(port, "/sdapi/v1/extensions")}
    text = tail(log, 200_000)
    assert "Failed reading extension data" not in text, text[-3000:]
    pins = json.loads((Path(__file__).resolve().parents[2] / "lowvram" / "data" / "extensions.json").read_text())
    for key, dirname, url in [(k, v["dir"], v["url"]) for k, v in pins["extensions"].items()]:
        assert dirname in listed, f"{key}: A1111 does not list {dirname}: {sorted(listed)}"
        entry = listed[dirname]
        assert entry["remote"].rstrip("/").removesuffix(".git") == url.rstrip("/").removesuffix(".git"), entry
        assert entry["commit_hash"] and pins["extensions"][key]["ref"].startswith(entry["commit_hash"][:7]), entry
        assert entry["version"] and entry["branch"], entry


def test_apply_then_webui_sh_records_a_real_job(a1111: Tree) -> None:
    a1111.lowvram("apply", "--webui", str(a1111.path), check=True)
    port, log = free_port(), a1111.path.parent / "ui.log"
    _start_webui_sh(a1111, port, log)  # the CPU flags come from the block lowvram wrote
    txt2img(port, steps=3)  # warm-up: the first job includes the model load
    started = time.monotonic()
    txt2img(port, width=64, height=64, steps=3)
    request_s = time.monotonic() - started
    records = [r for r in read_observations(a1111.env_home) if r.get("source") == "hook"]
    assert len(records) == 2, records
    last = records[-1]
    assert (last["width"], last["height"], last["steps"], last["batch"]) == (64, 64, 3, 1), last
    assert last["ok"] is True and last["device"] == "cpu", last
    assert last["checkpoint"].startswith("random-sd15.safetensors|"), last
    # s/it is measured per step: never null, never more than the whole request per step
    assert last["sit"] is not None and 0 < last["sit"] <= request_s / 3 * 1.05, (last, request_s)
    assert last["wall_s"] is not None and last["sit"] * 3 <= last["wall_s"] * 1.05 <= request_s * 1.1, (last, request_s)


def test_launch_two_step_job_has_an_exact_sit(a1111: Tree) -> None:
    """A1111 1.8's sampling_step lags one step: a 2-step job once gave no s/it at all."""
    port, log = free_port(), a1111.path.parent / "launch.log"
    _start_launch(a1111, port, log)
    txt2img(port, steps=2)
    txt2img(port, steps=2)
    records = [r for r in read_observations(a1111.env_home) if r.get("source") == "hook"]
    assert [r["steps"] for r in records] == [2, 2], records
    assert all(r["sit"] is not None and r["sit"] > 0 for r in records), records


def test_ctrl_c_stops_the_whole_ui(a1111: Tree) -> None:
    port, log = free_port(), a1111.path.parent / "launch.log"
    proc = _start_launch(a1111, port, log)
    pids = _group_pids(proc.pid)
    assert len(pids) >= 3, pids  # lowvram, bash webui.sh, python launch.py
    # A terminal's Ctrl-C: SIGINT to the foreground process group.
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pids), f"left running after Ctrl-C: {_alive(pids)}\n{tail(log)}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the UI still answers on its port"


def test_a_ui_that_fails_to_start_makes_launch_fail(a1111: Tree) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "lowvram", "launch", "--webui", str(a1111.path), "--",
                               *api_args(port)], cwd=a1111.path, env=a1111.env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode != 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_second_launch_and_apply_are_refused_while_the_ui_runs(a1111: Tree) -> None:
    port, log = free_port(), a1111.path.parent / "launch.log"
    proc = _start_launch(a1111, port, log)
    before = _sha(a1111.webui_user)
    second = a1111.lowvram("launch", "--webui", str(a1111.path), "--", *api_args(free_port()), timeout=120)
    assert second.returncode != 0, second.stdout + second.stderr
    again = a1111.lowvram("apply", "--webui", str(a1111.path), "--offload", "none", timeout=120)
    assert again.returncode != 0, again.stdout + again.stderr
    for done in (second, again):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines and "Traceback" not in done.stderr, done.stderr
    assert _sha(a1111.webui_user) == before
    kill_group(proc, signal.SIGINT)


def _listening_addresses(root_pid: int, stop: threading.Event, seen: set[str]) -> None:
    while not stop.is_set():
        for pid in _group_pids(root_pid):
            try:
                for conn in psutil.Process(pid).net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        seen.add(conn.laddr.ip)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stop.wait(0.5)


def test_tune_on_the_real_api_listens_on_loopback_and_leaves_the_tree_as_it_was(a1111: Tree) -> None:
    # A user's own webui-user.sh (hand-edited), then a block planned for their GTX 1070 with
    # --offload medvram (written from that box's facts): tune, which runs here on the CPU, must
    # put that block back, not its own CPU plan (seen: a user's --offload block lost).
    # Their line also keeps A1111 on this GPU-less machine's CPU (the GTX 1070 plan would not).
    own = " ".join(("--no-half-vae", *CPU_ARGS))
    a1111.webui_user.write_bytes(a1111.webui_user.read_bytes() + f'export COMMANDLINE_ARGS="{own}"\n'.encode())
    facts = write_gtx1070_facts(a1111.path.parent / "gtx1070.json")
    profile = install_noext_profile(a1111.env_home)
    a1111.lowvram("apply", "--webui", str(a1111.path), "--facts", str(facts), "--profile", profile,
                  "--offload", "medvram", check=True)
    assert "--medvram" in a1111.webui_user.read_text()
    hook_json = next(a1111.env_home.rglob("hook.json"))
    before = {p: p.read_bytes() for p in (a1111.webui_user, hook_json)}
    # This machine has no NVIDIA GPU, and tune refuses at once where there is nothing to tune:
    # nothing starts, nothing changes.
    refused = a1111.lowvram("tune", "--webui", str(a1111.path), "--steps", "2", timeout=60)
    assert refused.returncode == 1 and "nothing to tune" in refused.stderr, refused.stderr
    assert all(path.read_bytes() == data for path, data in before.items())
    # With the GTX 1070's facts tune plans for that card; the UI itself runs on this CPU.
    proc = a1111.start([sys.executable, "-m", "lowvram", "tune", "--webui", str(a1111.path), "--facts", str(facts),
                        "--width", "64", "--height", "64", "--steps", "2", "--repeats", "1", "--max-minutes", "4",
                        "--json"], a1111.path.parent / "tune.json")
    seen: set[str] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_listening_addresses, args=(proc.pid, stop, seen), daemon=True)
    watcher.start()
    try:
        code = proc.wait(timeout=600)
    finally:
        stop.set()
        watcher.join()
    out = (a1111.path.parent / "tune.json").read_text()
    assert code == 0, out[-3000:]
    result = json.loads(out[out.index("{"):])
    assert result["best"] is not None, result
    assert seen and seen <= {"127.0.0.1"}, f"tune's UI listened on {seen}"
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path.name} changed by tune"


def test_revert_restores_webui_user_and_removes_installed_extensions(a1111: Tree) -> None:
    original = a1111.webui_user.read_bytes()
    shipped = sorted(p.name for p in (a1111.path / "extensions").iterdir())  # A1111's own placeholder file
    real = a1111.real
    a1111.lowvram("apply", "--webui", str(a1111.path), check=True)
    a1111.lowvram("install-extensions", "--webui", str(a1111.path),
                  "--source", f"vram-estimator={real.extension_clone('vram-estimator')}",
                  "--source", f"giant-kitten={real.extension_clone('giant-kitten')}", check=True)
    installed = sorted(p.name for p in (a1111.path / "extensions").iterdir())
    assert len(installed) >= len(shipped) + 3, installed
    done = a1111.lowvram("revert", "--webui", str(a1111.path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert a1111.webui_user.read_bytes() == original
    left = sorted(p.name for p in (a1111.path / "extensions").iterdir())
    assert left == shipped, left
    status = subprocess.run(["git", "-C", str(a1111.path), "status", "--porcelain"], capture_output=True,
                            text=True, check=True).stdout
    assert status == "", status
