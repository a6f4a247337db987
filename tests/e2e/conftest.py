"""The real-UI tier: lowvram's real commands against a real AUTOMATIC1111 v1.8.0 on this machine's CPU.

The UI is built by the project's test-bed script (`shared/tools/real-a1111/build.sh`: the tree at
v1.8.0, its venv with torch, the pinned `repositories/`, an offline CLIP tokenizer and a randomly
initialised SD 1.5 checkpoint) from local clones of the upstream repositories. Where it looks:

- `LOWVRAM_E2E_A1111`: a folder that build.sh already filled (it holds `stable-diffusion-webui/`
  and `a1111-env.sh`); used as it is;
- otherwise build.sh is run (seconds when already built) with `MIRROR=$LOWVRAM_E2E_MIRROR`
  (default `/work/.mirror`, one `owner+name/repo` clone per upstream repository) into
  `$LOWVRAM_E2E_CACHE` (default `~/.cache/lowvram-e2e`); the script is `$LOWVRAM_E2E_BUILD`
  (default `../shared/tools/real-a1111/build.sh` beside this repository).

Without either, every e2e test is skipped with one line saying why. Each test gets its own tree: a
`git clone --shared` of the built one (seconds), with the heavy parts (venv, repositories/) linked
and the checkpoint hard-linked, so a test may apply, install, start and revert freely.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
A1111_COMMIT = "bef51aed032c0aaa5cfd80445bc4cf0d85b408b5"
A1111_URL = "https://github.com/AUTOMATIC1111/stable-diffusion-webui.git"
CHECKPOINT = "random-sd15.safetensors"
EXTENSION_CLONES = {
    "vram-estimator": "space-nuko+a1111-stable-diffusion-webui-vram-estimator",
    "giant-kitten": "klimaleksus+stable-diffusion-webui-giant-kitten",
}
# The flags A1111 needs to run on this machine's CPU (no GPU here): what a CPU user passes.
CPU_ARGS = ("--use-cpu", "all", "--skip-torch-cuda-test", "--no-half", "--precision", "full")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


def _mirror() -> Path:
    return Path(os.environ.get("LOWVRAM_E2E_MIRROR", "/work/.mirror"))


def _build_script() -> Path:
    default = REPO.parent / "shared" / "tools" / "real-a1111" / "build.sh"
    return Path(os.environ.get("LOWVRAM_E2E_BUILD", str(default)))


def _why_not() -> str | None:
    """None when the real A1111 can be had; else the one line the skip shows."""
    given = os.environ.get("LOWVRAM_E2E_A1111")
    if given:
        if not (Path(given) / "stable-diffusion-webui" / "launch.py").is_file():
            return f"LOWVRAM_E2E_A1111={given} holds no built stable-diffusion-webui"
        return None
    if not _build_script().is_file():
        return (f"no real A1111: set LOWVRAM_E2E_A1111 to a build, or LOWVRAM_E2E_BUILD to build.sh "
                f"(not found at {_build_script()})")
    missing = [n for n in ("lllyasviel+stable-diffusion-webui-forge", "openai+CLIP", "crowsonkb+k-diffusion")
               if not (_mirror() / n / "repo").exists()]
    if missing:
        return f"no real A1111: upstream clones missing under {_mirror()} ({', '.join(missing)}); set LOWVRAM_E2E_MIRROR"
    return None


@dataclass
class RealA1111:
    root: Path  # build.sh's $E2E
    env: dict[str, str]

    @property
    def tree(self) -> Path:
        return self.root / "stable-diffusion-webui"

    def extension_clone(self, key: str) -> Path:
        return _mirror() / EXTENSION_CLONES[key] / "repo"


def _sourced_env(env_file: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f'source "{env_file}" && env -0'], capture_output=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


@pytest.fixture(scope="session")
def real_a1111() -> RealA1111:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    given = os.environ.get("LOWVRAM_E2E_A1111")
    if given:
        root = Path(given)
    else:
        root = Path(os.environ.get("LOWVRAM_E2E_CACHE", str(Path.home() / ".cache" / "lowvram-e2e")))
        env = {**os.environ, "MIRROR": str(_mirror()), "E2E": str(root), "SMOKE": "0"}
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".build.lock", "w") as lock:  # two test runs at once build it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = subprocess.run(["bash", str(_build_script())], env=env, capture_output=True, text=True,
                                  timeout=3600)
        if done.returncode != 0:
            pytest.fail(f"building the real A1111 failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    env = _sourced_env(root / "a1111-env.sh")
    return RealA1111(root, env)


@dataclass
class Tree:
    """One test's own A1111 tree, and the environment every command in it runs with."""

    path: Path
    env: dict[str, str]
    real: RealA1111
    env_home: Path = Path()
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def webui_user(self) -> Path:
        return self.path / "webui-user.sh"

    def lowvram(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True,
                              env=self.env, cwd=self.path, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"lowvram {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a command in its own process group (as a terminal would), output to `log`."""
        with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, cwd=self.path, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM first, so a `lowvram launch` still running forwards it to the UI's own process group and waits
        for it (a SIGKILL cannot be forwarded: the UI would be left running, 5 GB each); then SIGKILL."""
        for proc in self.procs:
            if proc.poll() is None:
                kill_group(proc, signal.SIGTERM, wait=60)
            kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL, wait: float = 30) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass


def _copy_tree(real: RealA1111, dest: Path) -> None:
    src = real.tree
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(src), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", A1111_COMMIT], check=True)
    subprocess.run(["git", "-C", str(dest), "remote", "set-url", "origin", A1111_URL], check=True)
    (dest / "venv").symlink_to(src / "venv")
    (dest / "repositories").symlink_to(src / "repositories")
    models = dest / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src / "models" / "Stable-diffusion" / CHECKPOINT, models / CHECKPOINT)
    except OSError:  # another filesystem: a copy (2.1 GB, slower)
        shutil.copy2(src / "models" / "Stable-diffusion" / CHECKPOINT, models / CHECKPOINT)


@pytest.fixture
def a1111(real_a1111: RealA1111, tmp_path: Path, lowvram_home: Path) -> Iterator[Tree]:
    dest = tmp_path / "stable-diffusion-webui"
    _copy_tree(real_a1111, dest)
    env = dict(real_a1111.env)
    for var in ("LOWVRAM_WEBUI", "LOWVRAM_FACTS", "LOWVRAM_CONFIG", "LOWVRAM_HOOK", "COMMANDLINE_ARGS"):
        env.pop(var, None)
    env["LOWVRAM_HOME"] = str(lowvram_home)
    env["PYTHONPATH"] = str(REPO)  # `python -m lowvram` from this checkout, whatever the cwd
    env["GIT_ALLOW_PROTOCOL"] = "file"
    env["COLUMNS"] = os.environ.get("COLUMNS", "1000")  # screens read unwrapped, as in tests/conftest.py
    tree = Tree(dest, env, real_a1111, env_home=lowvram_home)
    try:
        yield tree
    finally:
        tree.stop_all()


# -- talking to the running UI ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(port: int, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_api(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> None:
    """Until the UI answers /sdapi/v1/sd-models; fails with the log's tail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the UI exited {proc.returncode} before answering:\n{tail(log)}")
        try:
            api(port, "/sdapi/v1/sd-models", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"the UI did not answer on port {port} within {timeout:.0f} s:\n{tail(log)}")


def txt2img(port: int, *, width: int = 64, height: int = 64, steps: int = 2, batch: int = 1) -> Any:
    return api(port, "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": steps, "width": width, "height": height,
                                           "batch_size": batch, "sampler_name": "Euler", "seed": 1})


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def api_args(port: int) -> list[str]:
    return ["--api", "--nowebui", "--server-name", "127.0.0.1", "--port", str(port)]


def read_observations(home: Path) -> list[dict[str, Any]]:
    found = sorted(home.rglob("observations*.jsonl"))
    records: list[dict[str, Any]] = []
    for path in found:
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


# -- the real ComfyUI and the real Forge (issue 19) -----------------------------------------------
# Built by `shared/tools/real-comfy/build.sh` and `shared/tools/real-forge/build.sh`; used only where
# LOWVRAM_E2E_COMFY / LOWVRAM_E2E_FORGE name the build (its $E2E folder), else skipped with a reason.


@dataclass
class RealUi:
    """A built real UI: its tree, and the environment lowvram and the UI run with."""

    tree: Path
    env: dict[str, str]

    def lowvram(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True,
                              env=self.env, cwd=self.tree, timeout=timeout)

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as fh:
            return subprocess.Popen(argv, cwd=self.tree, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)


def _real_ui_env(env_file: Path, home: Path, tmp: Path) -> dict[str, str]:
    env = _sourced_env(env_file)
    for var in ("LOWVRAM_WEBUI", "LOWVRAM_FACTS", "LOWVRAM_CONFIG", "LOWVRAM_HOOK", "COMMANDLINE_ARGS"):
        env.pop(var, None)
    mirror = tmp / "empty-mirror"  # extensions fail at once, offline; launch goes on without them
    mirror.mkdir(exist_ok=True)
    env.update(LOWVRAM_HOME=str(home), PYTHONPATH=str(REPO), LOWVRAM_MIRROR=str(mirror),
               COLUMNS=os.environ.get("COLUMNS", "1000"))
    return env


@pytest.fixture
def real_comfy(tmp_path: Path, lowvram_home: Path) -> RealUi:
    given = os.environ.get("LOWVRAM_E2E_COMFY")
    if not given:
        pytest.skip("no real ComfyUI: set LOWVRAM_E2E_COMFY to a real-comfy build (shared/tools/real-comfy)")
    root = Path(given)
    if not (root / "ComfyUI" / "comfy" / "cli_args.py").is_file() or not (root / "comfy-env.sh").is_file():
        pytest.fail(f"LOWVRAM_E2E_COMFY={given} holds no built ComfyUI (ComfyUI/, comfy-env.sh)")
    # lowvram writes nothing into a ComfyUI tree (its state is under LOWVRAM_HOME): the build is used as is.
    return RealUi(root / "ComfyUI", _real_ui_env(root / "comfy-env.sh", lowvram_home, tmp_path))


@pytest.fixture
def real_forge(tmp_path: Path, lowvram_home: Path) -> RealUi:
    given = os.environ.get("LOWVRAM_E2E_FORGE")
    if not given:
        pytest.skip("no real Forge: set LOWVRAM_E2E_FORGE to a real-forge build (shared/tools/real-forge)")
    root = Path(given)
    src = root / "stable-diffusion-webui-forge"
    if not (src / "backend" / "args.py").is_file() or not (root / "forge-env.sh").is_file():
        pytest.fail(f"LOWVRAM_E2E_FORGE={given} holds no built Forge (stable-diffusion-webui-forge/, forge-env.sh)")
    # `launch` writes its block into webui-user.sh: each test gets its own copy (the venv linked).
    dest = tmp_path / "stable-diffusion-webui-forge"
    dest.mkdir()
    for entry in src.iterdir():
        if entry.name == "venv":
            (dest / "venv").symlink_to(entry)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, dest / entry.name, follow_symlinks=False)
    return RealUi(dest, _real_ui_env(root / "forge-env.sh", lowvram_home, tmp_path))


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Until the UI answers GET `path`; fails with the log's tail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the UI exited {proc.returncode} before answering:\n{tail(log)}")
        try:
            api(port, path, timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"the UI did not answer on port {port} within {timeout:.0f} s:\n{tail(log)}")
