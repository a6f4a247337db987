"""Starting the WebUI the way its user would, and learning how it ended (docs/architecture.md#the-cli-contract, docs/architecture.md#from-facts-to-a-launch).

`build_launch()` decides the exact command, working directory and environment changes (nothing is
written: `launch --dry-run` shows it as is). `start_ui()` runs it as a child in its own process
group; `run_launch()` also forwards Ctrl-C/SIGTERM to that group and returns the UI's exit code.

A1111's `webui.sh` always exits 0 (its restart loop ends on an `if`), so lowvram goes through it
(its venv, TCMalloc and restart handling stay the UI's) with `LAUNCH_SCRIPT` pointing at a small
wrapper in lowvram's state dir. webui.sh runs the wrapper with the interpreter it chose; the wrapper
runs the tree's `launch.py` as a child with that same interpreter and writes the child's exit status
(a signal death included) to a status file that lowvram reads when the UI is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from lowvram.core.errors import LaunchError, UsageError
from lowvram.core.facts import Facts
from lowvram.core.plan import Plan
from lowvram.ui import FORGE_LINEAGE
from lowvram.ui.base import FlagSet, UiAdapter, flags_for
from lowvram.world import paths
from lowvram.world.detect.launcher import SETTINGS, SETTINGS_SH, read_launcher, read_script, runs_webui_sh
from lowvram.world.fsutil import FileLock, atomic_write_text

# Forge's lineage (Forge, Forge Neo, reForge) starts through a webui.sh too. Forge and reForge keep A1111's,
# LAUNCH_SCRIPT and install_dir/clone_dir included; Forge Neo's is its own (world/detect/launcher.py).
WEBUI_SH_UIS = ("a1111", "sdnext", *FORGE_LINEAGE)
# webui.sh of A1111 and Forge honour LAUNCH_SCRIPT and install_dir/clone_dir (a tree whose webui.sh is
# Neo's takes _settings_spec first); SD.Next's `exec`s launch.py itself, so its exit status is already the UI's.
WRAPPED_UIS = ("a1111", *FORGE_LINEAGE)

STATUS_ENV = "LOWVRAM_LAUNCH_STATUS"
SCRIPT_ENV = "LOWVRAM_LAUNCH_SCRIPT"

# Forwarded to the UI's process group. The third Ctrl-C/SIGTERM stops it for good (SIGKILL).
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP")
KILL_AFTER = 3
# How long wait() lets the process group finish once the UI's status is known.
SETTLE_S = 2.0

_USER_LAUNCH_SCRIPT = re.compile(r"^\s*(?:export\s+)?LAUNCH_SCRIPT=", re.MULTILINE)

WRAPPER_SOURCE = '''"""lowvram's LAUNCH_SCRIPT for webui.sh (written by `lowvram launch`; safe to delete).

webui.sh runs this with the interpreter it chose. It runs the WebUI's own launch script as a child
with that same interpreter and the same arguments, and writes how the child ended to the file named
by LOWVRAM_LAUNCH_STATUS, because webui.sh itself always exits 0.
"""
import json
import os
import signal
import subprocess
import sys


def _write(path, data):
    if not path:
        return
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def main():
    status = os.environ.pop("LOWVRAM_LAUNCH_STATUS", "")
    script = os.environ.pop("LOWVRAM_LAUNCH_SCRIPT", "") or "launch.py"
    os.environ.pop("LAUNCH_SCRIPT", None)
    # lowvram signals the whole process group, so the child gets Ctrl-C/SIGTERM itself; this
    # process outlives it to record its status. (A handler, not SIG_IGN: SIG_IGN is inherited.)
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: None)
    cmd = [sys.executable]
    if getattr(sys.stdout, "write_through", False):
        cmd.append("-u")
    cmd += [script] + sys.argv[1:]
    try:
        child = subprocess.Popen(cmd)
    except OSError as exc:
        _write(status, {"state": "exited", "returncode": 1, "error": str(exc)})
        return 1
    _write(status, {"state": "running", "pid": child.pid, "wrapper": os.getpid()})
    while True:
        try:
            rc = child.wait()
            break
        except KeyboardInterrupt:
            continue
    _write(status, {"state": "exited", "returncode": rc, "pid": child.pid})
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
'''


@dataclass(frozen=True)
class LaunchSpec:
    """The exact command that starts the UI, where, and what changes in its environment."""

    argv: tuple[str, ...]
    cwd: Path
    env_changes: dict[str, str]
    env_unset: tuple[str, ...] = ()
    ui: str = "a1111"
    target_os: str = "linux"
    stdin_closed: bool = False
    wrapper_path: Path | None = None  # the LAUNCH_SCRIPT wrapper to write before starting
    status_path: Path | None = None  # where the wrapper records the UI's exit status
    exit_code_of: str = "the UI"  # whose exit code run_launch returns: the UI's, or its launcher's (cmd, webui.sh)
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The `launch` object of `launch --dry-run --json` (docs/architecture.md#the-cli-contract)."""
        return {
            "argv": list(self.argv),
            "cwd": str(self.cwd),
            "env": dict(self.env_changes),
            "unset": list(self.env_unset),
            "stdin": "closed" if self.stdin_closed else "inherited",
            "exit_status": str(self.status_path) if self.status_path else None,
            "exit_code_of": self.exit_code_of,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key in self.env_unset:
            env.pop(key, None)
        env.update(self.env_changes)
        return env

    def command_line(self) -> str:
        """A copy-pasteable shell line (for humans; the JSON has the exact argv)."""
        import shlex

        if self.target_os == "windows":
            return subprocess.list2cmdline(list(self.argv))
        return " ".join(shlex.quote(a) for a in self.argv)


def launch_dir(webui: Path) -> Path:
    return paths.webui_state_dir(webui) / "launch"


def wrapper_path(webui: Path) -> Path:
    return launch_dir(webui) / "lowvram_launch_wrapper.py"


def status_path(webui: Path) -> Path:
    return launch_dir(webui) / "status.json"


def _host_os() -> str:
    if os.name == "nt":
        return "windows"
    return "darwin" if sys.platform == "darwin" else "linux"


def _euid() -> int | None:
    geteuid = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else None


def build_launch(
    plan: Plan,
    facts: Facts,
    webui: Path | None,
    *,
    extra_args: Sequence[str] = (),
    python: Path | None = None,
    no_hook: bool = False,
    euid: int | None = -1,
    environ: Mapping[str, str] | None = None,
) -> LaunchSpec:
    """The command, cwd and environment changes that start `plan`'s UI in `webui`.

    Pure apart from reading the tree (which launcher files exist). `euid` is the effective user id
    that decides `-f` (default: this process'); `environ` the environment lowvram runs in.
    """
    if webui is None:
        raise LaunchError(
            "no WebUI to launch: none was given and none was found",
            "point at one with --webui PATH or LOWVRAM_WEBUI=PATH, or install one with `lowvram setup`",
        )
    tree = Path(webui).expanduser().resolve()
    env_in = os.environ if environ is None else environ
    uid = _euid() if euid == -1 else euid
    ui = plan.ui
    target = facts.system.os
    version = facts.webui.version if facts.webui is not None else None
    extra = tuple(extra_args)
    if extra:
        adapter, flagset = _installed_flags(ui, facts)
        adapter.validate(list(extra), version, flagset)

    notes: list[str] = []
    warnings: list[str] = []
    env: dict[str, str] = {}
    unset: list[str] = []
    if no_hook:
        env["LOWVRAM_HOOK"] = "off"
        notes.append("--no-hook: LOWVRAM_HOOK=off, so the hook inside the UI does nothing this run")

    if ui == "comfyui":
        return _comfyui_spec(plan, facts, tree, target, extra=extra, python=python, env=env, notes=notes)

    if ui not in WEBUI_SH_UIS:
        raise LaunchError(f"lowvram cannot launch a {ui!r} WebUI", "use --ui a1111, forge, sdnext or comfyui")

    warnings += _overridden_extra(plan, facts, ui, version, extra)

    if target == "windows":
        return _windows_spec(plan, tree, extra=extra, python=python, env=env, notes=notes, warnings=warnings)

    if read_launcher(tree, ui).style == SETTINGS:
        return _settings_spec(tree, ui, target, extra=extra, python=python, env=env, notes=notes, warnings=warnings)
    argv: list[str] = ["bash", "webui.sh"]
    if uid == 0:
        argv.append("-f")
        notes.append("running as root: -f goes first so webui.sh agrees to start (its getopts stops at the "
                     "first non-option)")
    argv += extra
    if ui in WRAPPED_UIS:
        env["install_dir"] = str(tree.parent)
        env["clone_dir"] = tree.name
        env["LAUNCH_SCRIPT"] = str(wrapper_path(tree))
        env[STATUS_ENV] = str(status_path(tree))
        env[SCRIPT_ENV] = "launch.py"
        notes.append("install_dir/clone_dir point webui.sh at this tree (A1111 1.8 looks for .git in the working "
                     "directory and would clone a fresh copy beside a zip install)")
        if _user_sets_launch_script(tree):
            warnings.append("webui-user.sh sets LAUNCH_SCRIPT itself, so lowvram cannot learn the UI's exit code "
                            "(webui.sh always exits 0)")
    if python is not None:
        env["python_cmd"] = str(python)
        notes.append(f"--python: webui.sh's python_cmd is {python} (A1111 1.8 runs the UI with it after "
                     "activating the venv; 1.10 uses it to create the venv)")
    virtual_env = env_in.get("VIRTUAL_ENV")
    if virtual_env and _same_path(virtual_env, sys.prefix) and not _same_path(virtual_env, tree / "venv"):
        unset.append("VIRTUAL_ENV")
        notes.append("VIRTUAL_ENV (lowvram's own venv) is cleared, so webui.sh activates the WebUI's venv")
    return LaunchSpec(
        argv=tuple(argv),
        cwd=tree,
        env_changes=env,
        env_unset=tuple(unset),
        ui=ui,
        target_os=target,
        wrapper_path=wrapper_path(tree) if ui in WRAPPED_UIS else None,
        status_path=status_path(tree) if ui in WRAPPED_UIS else None,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


def _comfyui_spec(plan: Plan, facts: Facts, tree: Path, target: str, *, extra: tuple[str, ...],
                  python: Path | None, env: dict[str, str], notes: list[str]) -> LaunchSpec:
    """ComfyUI's own Python on main.py, the plan's flags on its command line (it has no webui-user file)."""
    interpreter = _comfyui_python(tree, python, target, facts)
    env.update({k: v for k, v in plan.env.items() if k not in ("COMMANDLINE_ARGS", "LOWVRAM_CONFIG")})
    notes.append("ComfyUI has no webui-user file: the planned flags go on main.py's command line")
    return LaunchSpec(argv=(str(interpreter), "main.py", *plan.args, *extra), cwd=tree, env_changes=env, ui=plan.ui,
                      target_os=target, stdin_closed=False, notes=tuple(notes))


def _settings_spec(tree: Path, ui: str, target: str, *, extra: tuple[str, ...], python: Path | None,
                   env: dict[str, str], notes: list[str], warnings: list[str]) -> LaunchSpec:
    """Forge Neo's launcher (world/detect/launcher.py): `bash webui-user.sh` where that runs webui.sh
    (as the user would), else `bash webui.sh`; webui.sh reads lowvram's block from webui.settings.sh."""
    script = "webui.sh"
    user_text = read_script(tree / "webui-user.sh")
    runs, passes_args = runs_webui_sh(user_text) if user_text is not None else (False, False)
    if runs:
        script = "webui-user.sh"
        if extra and not passes_args:
            raise UsageError(
                "extra UI arguments cannot reach webui.sh through webui-user.sh (it runs webui.sh without \"$@\")",
                "put them in webui-user.sh's COMMANDLINE_ARGS line instead")
    if python is not None:
        env["PYTHON"] = str(python)
        notes.append(f"--python: PYTHON={python} (webui.sh makes the venv with it; a webui.settings.sh or "
                     "webui-user.sh that sets PYTHON wins)")
    notes.append(("webui-user.sh runs webui.sh, which" if runs else "webui.sh")
                 + f" reads lowvram's flags from {SETTINGS_SH} and runs launch.py itself")
    notes.append("webui.sh ends by waiting for a key (\"Press any key to continue...\"): its stdin is closed so it "
                 "returns when the UI exits, and its exit code is that last read's, not the UI's")
    return LaunchSpec(argv=("bash", script, *extra), cwd=tree, env_changes=env, ui=ui, target_os=target,
                      stdin_closed=True, exit_code_of="webui.sh", notes=tuple(notes), warnings=tuple(warnings))


def _windows_spec(plan: Plan, tree: Path, *, extra: tuple[str, ...], python: Path | None, env: dict[str, str],
                  notes: list[str], warnings: list[str]) -> LaunchSpec:
    """`cmd /d /c webui-user.bat` (it runs lowvram's block, then webui.bat), stdin closed."""
    from lowvram.world.apply.webui_user import choose_target

    # The file apply put the block in: webui-user.bat when it calls webui.bat, else webui.bat
    # (which calls the webui.settings.bat holding the block first).
    script = "webui-user.bat" if choose_target(tree, "windows").path.name == "webui-user.bat" else "webui.bat"
    if script == "webui-user.bat" and extra:
        raise UsageError(
            "extra UI arguments cannot reach webui.bat through webui-user.bat (it calls webui.bat without them)",
            "put them in webui-user.bat's `set COMMANDLINE_ARGS=` line instead",
        )
    if python is not None:
        if script == "webui-user.bat":
            warnings.append("--python is ignored: webui-user.bat sets PYTHON itself")
        else:
            env["PYTHON"] = str(python)
    notes.append(f"{script} ends in `pause`: its stdin is closed so it returns when the UI exits")
    notes.append("on Windows the exit code is cmd's (webui.bat's last command), not necessarily the UI's")
    return LaunchSpec(
        argv=("cmd", "/d", "/c", script, *extra),
        cwd=tree,
        env_changes=env,
        ui=plan.ui,
        target_os="windows",
        stdin_closed=True,
        exit_code_of="cmd",
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


def _user_sets_launch_script(tree: Path) -> bool:
    text = read_script(tree / "webui-user.sh")
    return text is not None and _USER_LAUNCH_SCRIPT.search(text) is not None


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _comfyui_python(tree: Path, python: Path | None, target: str, facts: Facts) -> Path:
    """--python, else the tree's venv, else the portable build's python_embeded."""
    if python is not None:
        if not Path(python).exists():
            raise LaunchError(f"--python {python} does not exist", "give the path of ComfyUI's Python interpreter")
        return Path(python)
    candidates = [tree / "venv" / "Scripts" / "python.exe", tree / ".venv" / "Scripts" / "python.exe",
                  tree.parent / "python_embeded" / "python.exe"] if target == "windows" else \
                 [tree / "venv" / "bin" / "python", tree / ".venv" / "bin" / "python"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if facts.webui is not None and facts.webui.python:
        return Path(facts.webui.python)
    raise LaunchError(
        f"no Python found for ComfyUI in {tree} (no venv, no portable python_embeded)",
        "give the interpreter that has ComfyUI's packages with --python PATH",
    )


def _installed_flags(ui: str, facts: Facts) -> tuple[UiAdapter, FlagSet]:
    """The UI's adapter and the flags to check against: the installed version's own where they were read."""
    from lowvram import ui as ui_mod

    adapter = ui_mod.adapter(ui)
    webui = facts.webui
    installed = webui.ui_flags if webui is not None and webui.flavor == ui else None
    return adapter, flags_for(adapter, webui.version if webui is not None else None, installed)[0]


def _overridden_extra(plan: Plan, facts: Facts, ui: str, version: str | None, extra: tuple[str, ...]) -> list[str]:
    """A valued flag both after `--` and in COMMANDLINE_ARGS takes the block's value: say so."""
    if not extra:
        return []
    from lowvram import ui as ui_mod

    adapter, flagset = _installed_flags(ui, facts)
    block: list[str] = list(plan.args)
    if plan.merge == "assign":
        block = list(plan.user_args_kept) + block
    elif facts.webui is not None and facts.webui.user_args:
        block = list(facts.webui.user_args) + block
    mine = ui_mod.parse_args(list(extra), flagset, strict=False)
    theirs = ui_mod.parse_args(block, flagset, strict=False)
    out: list[str] = []
    for c in adapter.cross_contradictions(mine, theirs, flagset):
        if c.category.endswith(" value"):
            out.append(f"{' '.join(c.first)} (after --) is overridden by {' '.join(c.second)} from COMMANDLINE_ARGS: "
                       "the UI reads COMMANDLINE_ARGS after its command line, so the block's value wins")
        else:
            out.append(f"{' '.join(c.first)} (after --) and {' '.join(c.second)} (COMMANDLINE_ARGS) both apply "
                       f"({c.category})")
    return out


# ---------------------------------------------------------------------------------------------
# Running


def write_wrapper(path: Path) -> None:
    """The LAUNCH_SCRIPT wrapper; rewritten only when lowvram ships a different one."""
    try:
        if path.read_text(encoding="utf-8") == WRAPPER_SOURCE:
            return
    except OSError:
        pass
    atomic_write_text(path, WRAPPER_SOURCE)


def read_status(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def exit_code_from(shell_rc: int, status: dict[str, Any] | None) -> int:
    """The UI's exit code: the wrapper's record when there is one, else the launcher's own status.

    A death by signal N reads as 128 + N, as a shell reports it.
    """
    if status is not None and status.get("state") == "exited":
        rc = status.get("returncode")
        if isinstance(rc, int) and not isinstance(rc, bool):
            return rc if rc >= 0 else 128 - rc
    if shell_rc < 0:
        return 128 - shell_rc
    if status is not None and status.get("state") == "running":
        return 1  # the wrapper itself was killed: the UI's end is unknown
    return shell_rc


@dataclass
class RunningUI:
    """A started UI: its launcher process (the leader of its own process group)."""

    spec: LaunchSpec
    proc: subprocess.Popen[bytes]
    signals_sent: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, signum: int) -> None:
        """Signal the whole group (webui.sh, the wrapper, the UI and its children)."""
        self.signals_sent.append(signum)
        if os.name == "nt":  # pragma: no cover - Windows only
            # CREATE_NEW_PROCESS_GROUP: CTRL_BREAK_EVENT reaches cmd and the UI's Python alike.
            with contextlib.suppress(OSError):
                if signum == getattr(signal, "SIGKILL", None):
                    self.proc.kill()
                else:
                    self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def _group_alive(self) -> bool:
        if os.name == "nt":  # pragma: no cover
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # An orphan whose new parent does not reap it stays in the group as a zombie: not alive.
        return _group_has_live_member(self.proc.pid)

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the UI is gone and return its exit code (TimeoutExpired when it is not)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        shell_rc = self.proc.wait(timeout=timeout)
        status = read_status(self.spec.status_path)
        # webui.sh can die first (SIGTERM kills bash at once) while the UI still shuts down.
        while self.spec.status_path is not None and not (status and status.get("state") == "exited"):
            if not self._group_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.spec.argv, timeout or 0)
            time.sleep(0.05)
            status = read_status(self.spec.status_path)
        # The wrapper writes the status just before it exits: give the group a moment to be gone.
        settle = time.monotonic() + SETTLE_S
        while time.monotonic() < settle and self._group_alive():
            time.sleep(0.02)
        return exit_code_from(shell_rc, status)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM the group, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.proc.poll() is None or self._group_alive():
            self.send(signal.SIGTERM)
        try:
            return self.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if os.name == "nt":  # pragma: no cover - Windows only
                self.proc.kill()
            else:
                self.send(signal.SIGKILL)
            return self.wait(timeout=grace)


def _group_has_live_member(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def check_startable(spec: LaunchSpec) -> None:
    """Refuse a launch this machine cannot start, before anything is written into the tree.

    Facts from another OS (`--facts` from a Windows box) plan that OS's launcher; `launch` must
    say so before `apply` writes that OS's webui-user file here, not after.
    """
    if (spec.target_os == "windows") != (os.name == "nt"):
        raise LaunchError(
            f"this plan targets {spec.target_os}; lowvram cannot start that WebUI from this machine",
            "run `lowvram launch` on the machine the WebUI is on (--facts is for planning; "
            "`lowvram launch --dry-run` shows the command)",
        )
    if not spec.cwd.is_dir():
        raise LaunchError(f"the WebUI folder {spec.cwd} does not exist", "check --webui")


def start_ui(spec: LaunchSpec, lock: FileLock | None = None, *, stdout: IO[Any] | int | None = None,
             stderr: IO[Any] | int | None = None) -> RunningUI:
    """Start the UI as a child in its own process group; the lock's descriptor goes with it.

    Handing the lock's descriptor to the launcher keeps the WebUI locked while the UI runs, even if
    lowvram itself is killed (an OS file lock lives as long as any holder of the descriptor).
    """
    check_startable(spec)
    if spec.wrapper_path is not None:
        write_wrapper(spec.wrapper_path)
    if spec.status_path is not None:
        with contextlib.suppress(FileNotFoundError):
            spec.status_path.unlink()
    kwargs: dict[str, Any] = {}
    if os.name == "nt":  # pragma: no cover - Windows only
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
        fd = lock.fileno() if lock is not None else None
        if fd is not None:
            kwargs["pass_fds"] = (fd,)
    try:
        proc = subprocess.Popen(
            list(spec.argv),
            cwd=spec.cwd,
            env=spec.environment(),
            stdin=subprocess.DEVNULL if spec.stdin_closed else None,
            stdout=stdout,
            stderr=stderr,
            **kwargs,
        )
    except FileNotFoundError as exc:
        raise LaunchError(f"cannot start {spec.argv[0]}: not found", "install it or put it on PATH") from exc
    except OSError as exc:
        raise LaunchError(f"cannot start {spec.argv[0]}: {exc.strerror or exc}", "check the WebUI folder") from exc
    return RunningUI(spec, proc)


def run_launch(spec: LaunchSpec, lock: FileLock | None, *, stdout: IO[Any] | int | None = None) -> int:
    """Run the UI to its end with Ctrl-C/SIGTERM forwarded to its group; return its exit code.

    The caller holds `lock` (the WebUI's) and releases it after this returns.
    """
    running = start_ui(spec, lock, stdout=stdout)
    previous: dict[int, Any] = {}
    count = {"n": 0}

    def forward(signum: int, _frame: FrameType | None) -> None:
        count["n"] += 1
        kill = getattr(signal, "SIGKILL", None)
        running.send(kill if kill is not None and count["n"] >= KILL_AFTER else signum)

    import threading

    if threading.current_thread() is threading.main_thread():
        for name in FORWARDED:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            with contextlib.suppress(ValueError, OSError):
                previous[signum] = signal.signal(signum, forward)
    try:
        return running.wait()
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)
