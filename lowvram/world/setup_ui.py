"""`lowvram setup`: from nothing to a configured WebUI in one command (docs/architecture.md#the-cli-contract, "setup").

Order matters: everything that can refuse (no git, a foreign or unwritable target, too little disk)
is checked before anything is written, so a refusal leaves the disk as it was. Then the UI is
cloned at its pinned release through gitops (temp dir beside the target, verified, renamed into
place), the plan is applied, and the path is remembered. A small marker in lowvram's state dir
(`setup.json`) records how far a run got, so the next run after a kill says whether it resumed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram.core.errors import LowvramError, UsageError
from lowvram.world import fsutil, paths

UI_KEYS = ("a1111", "forge", "sdnext", "comfyui")
DEFAULT_UI = "a1111"
DEFAULT_MODEL = "sd15"  # what A1111's first start downloads; the plan is redone at every launch

Progress = Callable[[str, float, float | None], None]


class SetupError(LowvramError):
    """`lowvram setup` refused (before touching the disk) or failed."""


# ---------------------------------------------------------------------------------------------
# The registry (lowvram/data/uis.json)


@dataclass(frozen=True)
class Download:
    what: str
    download_mb: int
    disk_mb: int
    # None = always; "no-torch" (the UI's CUDA build) | "no-torch-cpu" (the CPU build a plan without an
    # NVIDIA GPU chooses, docs/architecture.md#the-policy, "Torch install") | "no-torch-cu126" (the CUDA 12.6
    # build a plan pins for a GPU the UI's own build has no kernels for) | "xformers" | "no-checkpoint"
    when: str | None = None


@dataclass(frozen=True)
class UiSpec:
    key: str
    name: str
    url: str
    tag: str | None
    commit: str | None
    commit_verified: bool
    why: str
    folder: str
    clone_mb: int
    python_supported: tuple[str, ...]
    python_why: str
    first_start: tuple[Download, ...] = ()
    notes: tuple[str, ...] = ()
    before_first_start: tuple[str, ...] = ()  # shell commands, `{dir}` = the tree (ComfyUI's venv)
    before_first_start_cpu: tuple[str, ...] = ()  # the same where the plan installs torch's CPU build
    min_cc: tuple[int, int] | None = None  # oldest GPU the torch build the UI installs supports
    min_cc_why: str = ""

    @property
    def pin(self) -> str:
        """What gets checked out: the release tag, else the pinned commit."""
        return self.tag or self.commit or "HEAD"


@dataclass(frozen=True)
class Registry:
    uis: dict[str, UiSpec]
    clone_margin_mb: int


def load_registry(path: Path | None = None) -> Registry:
    path = path or paths.data_file("uis.json")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        uis = {}
        for key, raw in data["uis"].items():
            py = raw.get("python") or {}
            uis[key] = UiSpec(
                key=key,
                name=raw["name"],
                url=raw["url"],
                tag=raw.get("tag"),
                commit=raw.get("commit"),
                commit_verified=bool(raw.get("commit_verified")),
                why=raw.get("why", ""),
                folder=raw["folder"],
                clone_mb=int(raw["clone_mb"]),
                python_supported=tuple(py.get("supported") or ()),
                python_why=py.get("why", ""),
                first_start=tuple(
                    Download(d["what"], int(d["download_mb"]), int(d["disk_mb"]), d.get("when"))
                    for d in raw.get("first_start") or ()
                ),
                notes=tuple(raw.get("notes") or ()),
                before_first_start=tuple(raw.get("before_first_start") or ()),
                before_first_start_cpu=tuple(raw.get("before_first_start_cpu") or ()),
                min_cc=_cc(raw.get("min_compute_capability")),
                min_cc_why=(raw.get("min_compute_capability") or {}).get("why", "") + "; "
                + (raw.get("min_compute_capability") or {}).get("hint", ""),
            )
        return Registry(uis=uis, clone_margin_mb=int(data["disk"]["clone_margin_mb"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"lowvram's UI registry {path} is unreadable ({exc})", "reinstall lowvram") from exc


def _cc(raw: Any) -> tuple[int, int] | None:
    if not raw:
        return None
    major, _, minor = str(raw["value"]).partition(".")
    return int(major), int(minor or 0)


# UIs lowvram plans and launches but does not install (no pinned release in data/uis.json): their own way in.
NOT_INSTALLED_BY_SETUP = {
    "forge-neo": ("Forge Neo", "git clone https://github.com/Haoming02/sd-webui-forge-classic sd-webui-forge-neo "
                                "--branch neo"),
    "reforge": ("reForge", "git clone https://github.com/Panchovix/stable-diffusion-webui-reForge"),
}


def not_installed_by_setup(key: str) -> UsageError:
    name, clone = NOT_INSTALLED_BY_SETUP[key]
    return UsageError(f"lowvram setup cannot install {name}: it has no release lowvram has pinned and tested",
                      f"install it yourself ({clone}, then its webui.sh), then `lowvram apply --webui PATH` there")


def ui_spec(key: str, registry: Registry | None = None) -> UiSpec:
    registry = registry or load_registry()
    if key in NOT_INSTALLED_BY_SETUP and key not in registry.uis:
        raise not_installed_by_setup(key)
    if key not in registry.uis:
        raise UsageError(f"unknown UI {key!r}", "choose one of: " + ", ".join(registry.uis))
    return registry.uis[key]


# ---------------------------------------------------------------------------------------------
# What is at the target


@dataclass(frozen=True)
class TargetInfo:
    path: Path
    kind: str  # absent | empty | webui | foreign
    flavor: str | None = None


def _detect_flavor(path: Path) -> str | None:
    from lowvram.world.detect.webui import detect_flavor

    return detect_flavor(path)


def inspect_target(path: Path) -> TargetInfo:
    """Read-only look at the target: nothing there, an empty folder, a WebUI, or something else."""
    if not path.exists() and not path.is_symlink():
        return TargetInfo(path, "absent")
    if not path.is_dir():
        return TargetInfo(path, "foreign")
    try:
        empty = not any(path.iterdir())
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}", "check the folder's permissions") from exc
    if empty:
        return TargetInfo(path, "empty")
    flavor = _detect_flavor(path)
    return TargetInfo(path, "webui" if flavor else "foreign", flavor)


def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


# ---------------------------------------------------------------------------------------------
# Preflight: the only reasons to stop before touching the disk (docs/architecture.md#the-cli-contract, "setup")


def git_executable() -> str | None:
    from lowvram.world import gitops

    return gitops.git_executable()


def _git_hint() -> str:
    from lowvram.world import gitops

    return gitops.install_git_hint()


def _write_error(path: Path) -> OSError | None:
    """Why a file cannot be made in the folder `path` (a temp file is made and removed: as root a
    mode check proves nothing, a read-only mount or another user's folder shows up here), or None.
    Refuses `sudo lowvram setup` into the user's own folder (what root made there would be root's)."""
    from lowvram.world.apply import refuse_sudo_on_own_folder, write_error

    try:
        refuse_sudo_on_own_folder(path)
    except LowvramError as exc:
        raise SetupError(exc.message, exc.hint) from exc
    err = write_error(path)
    if err is not None:
        return err
    if not os.access(path, os.W_OK | os.X_OK):  # what the mode bits say, where they count
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return None


def _not_writable(path: Path, exc: OSError, doing: str) -> SetupError:
    from lowvram.world.apply import not_writable

    why, todo = not_writable(path, exc)
    return SetupError(f"{doing}: {path} is not writable ({why})",
                      f"{todo}, or choose another folder with --dir; nothing was changed")


def preflight(spec: UiSpec, target: TargetInfo, registry: Registry) -> list[str]:
    """Refuse (SetupError) for what would make setup fail half way; return warnings for the rest."""
    warnings: list[str] = []
    if git_executable() is None:
        raise SetupError("git is not installed (or not on PATH); setup clones the WebUI with it", _git_hint())
    from lowvram.world import gitops

    try:
        gitops.require_git("to clone the WebUI and its extensions")  # a git that is there but does not run
    except gitops.GitMissingError as exc:
        raise SetupError(exc.message, exc.hint) from exc
    if target.kind == "foreign":
        if target.flavor:
            raise SetupError(
                f"{target.path} is a {target.flavor} install, not {spec.key}",
                f"run `lowvram setup --ui {target.flavor} --dir {target.path}` to configure it, or choose another --dir",
            )
        what = "a file" if not target.path.is_dir() else "not empty and not a Stable Diffusion WebUI"
        raise SetupError(
            f"{target.path} is {what}; setup will not clone into it",
            "choose an empty or new folder with --dir (nothing was changed)",
        )
    if target.kind == "webui":
        err = _write_error(target.path)
        if err is not None:
            raise _not_writable(target.path, err, f"cannot configure {target.path}")
        return warnings
    # absent or empty: a clone goes beside the target, then is renamed into place.
    base = _existing_ancestor(target.path.parent if target.kind == "absent" else target.path)
    if not base.is_dir():
        raise SetupError(f"cannot create {target.path}: {base} is not a folder",
                         "choose another folder with --dir (nothing was changed)")
    for folder in (base, target.path.parent) if target.kind == "empty" else (base,):
        err = _write_error(folder)
        if err is not None:
            raise _not_writable(folder, err, f"cannot create {target.path}")
    try:
        free_mb = shutil.disk_usage(base).free // 2**20
    except OSError:
        free_mb = None
    if free_mb is not None:
        needed = spec.clone_mb + registry.clone_margin_mb
        if free_mb < needed:
            raise SetupError(
                f"only {free_mb} MiB free on the disk holding {base}; cloning {spec.name} needs about {needed} MiB",
                "free some disk space or choose another disk with --dir",
            )
        first = sum(d.disk_mb for d in spec.first_start if d.when != "no-torch-cpu") + spec.clone_mb
        if free_mb < first:
            warnings.append(
                f"only {free_mb} MiB free: the clone fits, but its first start needs about {first} MiB more "
                "(torch, packages, a model); free some space before `lowvram launch`"
            )
    return warnings


def _python_version(exe: str) -> str | None:
    try:
        done = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    version = done.stdout.strip()
    return version if done.returncode == 0 and version else None


def host_python_warnings(spec: UiSpec) -> list[str]:
    """The UI's first start builds a venv with the system Python: warn when that one will not do.

    A1111's webui.sh prefers python3.10, then python3 (a pyenv shim for a missing version fails,
    so each candidate is run, not just found).
    """
    if sys.platform == "win32":
        names = ["python"]
    elif spec.key in ("a1111", "forge"):
        names = ["python3.10", "python3"]
    else:
        names = ["python3"]
    found = next(((exe, v) for n in names if (exe := shutil.which(n)) and (v := _python_version(exe))), None)
    wanted = " or ".join(spec.python_supported) or "3"
    if found is None:
        return [f"no working {names[-1]} on PATH: {spec.name}'s first start needs Python {wanted} "
                "(install it before `lowvram launch`)"]
    exe, version = found
    if spec.python_supported and version not in spec.python_supported:
        return [f"{exe} is Python {version}; {spec.name} wants {wanted} ({spec.python_why}): install a "
                "supported Python before `lowvram launch` (webui-user.sh's python_cmd can point at it)"]
    return []


def machine_warnings(spec: UiSpec) -> list[str]:
    """What doctor would flag on this machine (no GPU, old driver ...), and a GPU too old for the
    torch the UI installs: warnings, never a refusal (docs/architecture.md#the-cli-contract)."""
    try:
        from lowvram.world.detect import gather_facts
        from lowvram.world.diagnosis import run_checks

        facts = gather_facts()
        checks = run_checks(facts)
    except LowvramError as exc:
        return [f"could not check this machine: {exc.message}"]
    except Exception as exc:  # advisory only: a probe that breaks must not stop the install
        return [f"could not check this machine: {type(exc).__name__}: {exc}"]
    out = [check.message + (f" ({check.hint})" if check.hint else "")
           for check in checks if check.status == "fail" and not check.id.startswith("webui")]
    if spec.min_cc is not None:
        for gpu in facts.usable_gpus:
            cc = gpu.cc_tuple
            if cc is not None and cc < spec.min_cc:
                out.append(f"{gpu.name or 'the GPU'} (compute capability {gpu.compute_capability}) is too old for "
                           f"the torch {spec.name} installs: {spec.min_cc_why}")
    return out


# ---------------------------------------------------------------------------------------------
# The marker of a run in progress (lowvram's state dir, never the tree)


def _marker_path(target: Path) -> Path:
    return paths.webui_state_dir(target) / "setup.json"


def read_marker(target: Path) -> dict[str, Any]:
    try:
        data = json.loads(_marker_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(target: Path, **values: Any) -> None:
    fsutil.atomic_write_json(_marker_path(target), {"schema": 1, **values})


# ---------------------------------------------------------------------------------------------
# Leftovers of an interrupted clone


def leftover_clones(target: Path) -> list[Path]:
    """Temp clones a killed run left beside `target` (gitops names them `.<name>.lowvram-tmp-…`)."""
    prefix = f".{target.name}{fsutil.TEMP_MARK}"
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())
    except OSError:
        return []


def _finished_clone(tmp: Path, pin: str) -> str | None:
    """The commit of a temp clone that is complete (checked out at `pin`, nothing missing), or None."""
    from lowvram.world import gitops

    git = gitops.require_git("to clone the WebUI")
    try:
        repo = git.Repo(tmp)
    except Exception:
        return None
    try:
        head = repo.head.commit.hexsha
        if gitops.resolve_commit(repo, pin) != head:
            return None
        if repo.is_dirty(untracked_files=True):  # a checkout killed half way shows deleted files
            return None
        return str(head)
    except Exception:
        return None
    finally:
        repo.close()


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class SetupResult:
    ui: str
    dir: Path
    ref: str | None
    commit: str | None
    tag: str | None
    adopted: bool
    resumed: bool
    source: str | None
    cleaned: list[str] = field(default_factory=list)
    apply: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_start: list[Download] = field(default_factory=list)
    profile: str | None = None
    remembered: bool = True
    before_launch: list[str] = field(default_factory=list)
    # "cpu" where the plan makes the first start install torch's CPU build, "cu126" its CUDA 12.6 build
    torch_build: str | None = None

    @property
    def launch_command(self) -> str:
        return "lowvram launch --webui " + shlex.quote(str(self.dir))

    @property
    def first_start_download_mb(self) -> int:
        return sum(d.download_mb for d in self.first_start)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "ui": self.ui,
            "dir": str(self.dir),
            "ref": self.ref,
            "commit": self.commit,
            "tag": self.tag,
            "adopted": self.adopted,
            "resumed": self.resumed,
            "cleaned": list(self.cleaned),
            "source": self.source,
            "profile": self.profile,
            "apply": self.apply,
            "launch": self.launch_command,
            "first_start": [
                {"what": d.what, "download_mb": d.download_mb, "disk_mb": d.disk_mb} for d in self.first_start
            ],
            "first_start_download_mb": self.first_start_download_mb,
            "before_launch": list(self.before_launch),
            "torch_build": self.torch_build,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def default_dir(spec: UiSpec) -> Path:
    return paths.data_dir() / spec.folder


def _tree_commit(path: Path) -> tuple[str | None, str | None]:
    """(commit, tag at that commit) of a checkout, or (None, None) for a tree without git."""
    if not (path / ".git").exists():
        return None, None
    from lowvram.world import gitops

    try:
        repo = gitops.require_git().Repo(path)
    except Exception:
        return None, None
    try:
        head = repo.head.commit.hexsha
        tag = next((t.name for t in repo.tags if _tag_commit(t) == head), None)
        return str(head), tag
    except Exception:
        return None, None
    finally:
        repo.close()


def _tag_commit(tag: Any) -> str | None:
    try:
        return str(tag.commit.hexsha)
    except Exception:
        return None


def setup(
    *,
    ui: str | None = None,
    target: Path | None = None,
    ref: str | None = None,
    profile: str | None = None,
    model: str | None = None,
    sources: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    stage: Callable[[str], None] | None = None,
    registry: Registry | None = None,
    check_machine: bool = True,
) -> SetupResult:
    """Clone (or adopt) a WebUI, apply the plan, remember it. See the module docstring."""
    from lowvram.world import gitops

    registry = registry or load_registry()
    sources = dict(sources or {})
    for name in sources:
        if name not in registry.uis:
            raise UsageError(f"--source {name}=…: {name!r} is not a UI",
                             "use --source UI=URL with UI one of: " + ", ".join(registry.uis))
    say = stage or (lambda _msg: None)

    spec = ui_spec(ui or DEFAULT_UI, registry)
    dest = Path(target if target is not None else default_dir(spec)).expanduser()
    dest = Path(os.path.abspath(dest))
    info = inspect_target(dest)
    notes: list[str] = []
    if ui is None and info.kind == "webui" and info.flavor in NOT_INSTALLED_BY_SETUP:
        raise not_installed_by_setup(info.flavor)
    if ui is None and info.kind == "webui" and info.flavor in registry.uis and info.flavor != spec.key:
        spec = registry.uis[info.flavor]  # no --ui: take the UI that is there
        notes.append(f"{dest} holds {spec.name}; configuring it (pass --ui to choose)")
    if info.kind == "webui" and info.flavor != spec.key:
        info = TargetInfo(dest, "foreign", info.flavor)

    warnings = preflight(spec, info, registry)
    if check_machine:
        warnings += host_python_warnings(spec)
        warnings += machine_warnings(spec)

    # --- from here on the disk changes -------------------------------------------------------
    lock = fsutil.FileLock(paths.webui_state_dir(dest) / "setup.lock", f"setup of {dest}")
    lock.acquire()
    try:
        marker = read_marker(dest)
        pin = ref or spec.pin
        adopted = resumed = False
        cleaned: list[str] = []
        source: str | None = None
        commit: str | None = None
        tag: str | None = None

        if info.kind == "webui":
            commit, tag, resumed = _existing_tree(spec, dest, marker, ref=ref, pin=pin, say=say, warnings=warnings)
            adopted = not resumed
            ref_out = (marker.get("ref") if resumed else None) or tag or commit
        else:
            source = gitops.source_for(spec.key, spec.url, sources)
            origin = spec.url if gitops.normalise_url(source) != gitops.normalise_url(spec.url) else None
            for tmp in leftover_clones(dest):
                done = _finished_clone(tmp, pin) if not resumed and info.kind in ("absent", "empty") else None
                if done is not None:
                    if info.kind == "empty":
                        dest.rmdir()
                    os.rename(tmp, dest)
                    info = TargetInfo(dest, "webui", spec.key)
                    resumed, commit = True, done
                    say(f"resuming: a complete clone from an interrupted run was moved into {dest}")
                else:
                    fsutil.remove_tree(tmp)
                    cleaned.append(str(tmp))
            if cleaned and not resumed:
                say("removed a half-made clone left by an interrupted run; starting clean")
            if not resumed:
                write_marker(dest, ui=spec.key, dir=str(dest), ref=pin, source=source, phase="cloning")
                commit = _clone(spec, dest, info, pin=pin, source=source, origin=origin,
                                explicit_ref=ref is not None, progress=progress, say=say,
                                warnings=warnings)
            ref_out = pin
            tag = pin if pin == spec.tag else None
            if tag is None and commit:
                tag = _tree_commit(dest)[1]
            write_marker(dest, ui=spec.key, dir=str(dest), ref=pin, source=source, phase="cloned", commit=commit)
            fsutil.kill_point("setup:cloned")

        result = SetupResult(ui=spec.key, dir=dest, ref=ref_out, commit=commit, tag=tag, adopted=adopted,
                             resumed=resumed, source=source, cleaned=cleaned, warnings=warnings, notes=notes)
        write_marker(dest, ui=spec.key, dir=str(dest), ref=pin, source=source, phase="applying", commit=commit,
                     adopted=adopted)
        say("applying the plan")
        _apply(result, spec, profile=profile, model=model, progress=progress)
        write_marker(dest, ui=spec.key, dir=str(dest), ref=pin, source=source, phase="done", commit=commit,
                     adopted=adopted)
        result.notes.extend(spec.notes)
        result.before_launch = _before_launch(spec, dest, result.torch_build)
        return result
    finally:
        lock.release()


def _existing_tree(spec: UiSpec, dest: Path, marker: Mapping[str, Any], *, ref: str | None, pin: str,
                   say: Callable[[str], None], warnings: list[str]) -> tuple[str | None, str | None, bool]:
    """(commit, tag, resumed) of a tree already at `dest`: our own clone that a kill stopped before
    it was configured (resumed), or the user's (adopted as it is, with warnings)."""
    commit, tag = _tree_commit(dest)
    ours = (marker.get("phase") in ("cloning", "cloned", "applying") and marker.get("commit") in (None, commit)
            and not marker.get("adopted"))  # an adopted tree whose apply failed is still the user's
    if ours and commit is not None:
        say(f"resuming the interrupted setup of {dest} (the clone was complete)")
        return commit, tag, True
    say(f"{dest} already holds {spec.name}: adopting it (not cloning)")
    if ref is not None:
        warnings.append(f"--ref {ref} ignored: {dest} is adopted as it is (check out another "
                        "release there with git)")
    want = spec.commit if not ref else None
    if commit and want and commit != want and tag != pin:
        warnings.append(
            f"the adopted tree is at {tag or commit[:12]}, lowvram pins {spec.tag or spec.commit}; "
            "it was left as it is (update it with git if you want the pinned release)"
        )
    return commit, tag, False


def _clone(spec: UiSpec, dest: Path, info: TargetInfo, *, pin: str, source: str, origin: str | None,
           explicit_ref: bool, progress: Progress | None, say: Callable[[str], None], warnings: list[str]) -> str:
    from lowvram.world import gitops

    def verify(commit: str) -> None:
        if explicit_ref or not spec.commit or spec.tag is None or commit == spec.commit:
            return
        if origin is None:  # straight from the project: a tag that moved is not the release we pinned
            raise SetupError(
                f"{spec.url} tag {spec.tag} is commit {commit[:12]}, not the release lowvram pinned ({spec.commit[:12]})",
                f"pass --ref {spec.commit} to get the pinned commit, or --ref {spec.tag} to take the tag as it is now",
            )
        warnings.append(
            f"{source} has {spec.tag} at {commit[:12]}, not the upstream release {spec.commit[:12]}; "
            "using the mirror's (pass --ref to choose)"
        )

    say(f"cloning {spec.name} {pin} from {source}")
    if info.kind == "empty":
        dest.rmdir()  # gitops renames the finished clone into place
    try:
        return gitops.clone_pinned(source, pin, dest, origin_url=origin, progress=progress, before_rename=verify,
                                   offline_hint=_offline_hint(spec, source))
    except BaseException:
        if info.kind == "empty" and not dest.exists():
            with contextlib.suppress(OSError):
                dest.mkdir()
        raise


def _offline_hint(spec: UiSpec, source: str) -> str:
    """What to do when the source cannot be reached: the mirror that lacks this UI, or how to set one."""
    mirror = os.environ.get("LOWVRAM_MIRROR")
    if mirror and source == str(Path(mirror).expanduser().absolute() / spec.key):
        return (f"LOWVRAM_MIRROR={mirror} has no {spec.key} clone: put one at {source} (git clone --mirror "
                f"{spec.url} {source}), or unset LOWVRAM_MIRROR to clone from {spec.url}")
    if source != spec.url:  # from --source
        return (f"check --source {spec.key}={source}: it must be a clone of {spec.name} (a folder or a URL git "
                "can reach); offline, point it at a local clone")
    return (f"check your network; offline, set LOWVRAM_MIRROR=DIR with a clone of {spec.name} at DIR/{spec.key}, "
            f"or pass --source {spec.key}=PATH|URL (a local clone)")


def _apply(result: SetupResult, spec: UiSpec, *, profile: str | None, model: str | None,
           progress: Progress | None) -> None:
    from lowvram.core.errors import ProfileError
    from lowvram.core.plan import Overrides
    from lowvram.world import state
    from lowvram.world.apply import apply_plan
    from lowvram.world.plan_inputs import make_plan

    def plan_with(family: str | None) -> Any:
        return make_plan(webui=result.dir, facts_file=None, overrides=Overrides(profile=profile, model=family))

    try:
        ctx = plan_with(model)
    except ProfileError:
        if model is not None:
            raise
        # A tree with no checkpoint that is not A1111 (A1111 plans for the SD 1.5 its first start
        # downloads): plan for sd15 so the block is written; `launch` plans again for what it finds.
        ctx = plan_with(DEFAULT_MODEL)
        result.notes.append(
            f"no checkpoint yet: planned for {DEFAULT_MODEL}; `lowvram launch` plans again for the "
            "checkpoint it finds (or pass --model)"
        )
    applied = apply_plan(ctx.plan, ctx.webui or result.dir, ctx.facts, progress=progress)
    result.apply = _apply_dict(applied, ctx.plan)
    result.exit_code = int(getattr(applied, "exit_code", 0) or 0)
    result.profile = ctx.plan.profile
    result.warnings.extend(w for w in ctx.plan.warnings if w not in result.warnings)
    if getattr(ctx, "from_facts_file", False):
        result.remembered = False
        result.notes.append("facts came from a file: the path and profile were not remembered")
    else:
        state.remember(result.dir, profile)
    result.torch_build = plan_torch_build(ctx.plan)
    result.first_start = _first_start(spec, ctx)


def _before_launch(spec: UiSpec, dest: Path, torch_build: str | None) -> list[str]:
    """The commands to run before the first start (ComfyUI's venv), for the torch build the plan chose."""
    commands = (torch_build == "cpu" and spec.before_first_start_cpu) or spec.before_first_start
    return [cmd.replace("{dir}", shlex.quote(str(dest))) for cmd in commands]


def plan_torch_build(plan: Any) -> str | None:
    """The build the plan makes the UI's first start install instead of its own: "cpu" (no NVIDIA GPU),
    "cu126" (a GPU the UI's build has no kernels for), else None."""
    return next((str(d.value) for d in plan.decisions if d.setting == "torch_install" and d.value), None)


def _apply_dict(applied: Any, plan: Any) -> dict[str, Any]:
    to_dict = getattr(applied, "to_dict", None)
    if callable(to_dict):
        data = dict(to_dict())
        data.pop("schema", None)
        data.setdefault("plan", plan.to_dict())
        return data
    return {
        "plan": plan.to_dict(),
        "changes": [dict(c) if isinstance(c, Mapping) else c for c in getattr(applied, "changes", [])],
        "extensions": [dict(e) if isinstance(e, Mapping) else e for e in getattr(applied, "extensions", [])],
    }


def _first_start(spec: UiSpec, ctx: Any) -> list[Download]:
    webui = getattr(ctx.facts, "webui", None)
    args: Sequence[str] = ctx.plan.args
    build = plan_torch_build(ctx.plan)
    # The item for the build the plan pins where the registry has one, else the UI's own ("no-torch").
    torch_item = f"no-torch-{build}" if any(d.when == f"no-torch-{build}" for d in spec.first_start) else "no-torch"
    out = []
    for item in spec.first_start:
        if item.when == "xformers" and "--xformers" not in args:
            continue
        if (item.when or "").startswith("no-torch") and (
                (webui is not None and webui.torch) or item.when != torch_item):
            continue
        if item.when == "no-checkpoint" and webui is not None and webui.checkpoint:
            continue
        out.append(item)
    return out
