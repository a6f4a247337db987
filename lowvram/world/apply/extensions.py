"""Installing the registry's extensions into a WebUI: clone at the pin, never touch the user's.

An extension already there (installed by lowvram or by the UI's own installer) is recognised by
its normalised remote URL, not its folder name. A checkout with local changes or another remote is
never modified ("kept", with what to do). A checkout lowvram makes or moves is left on a local
branch at the pin (gitops.put_on_branch): A1111 cannot read a detached one's branch and shows
nothing for it. Every install is recorded in the manifest before the clone is renamed into place
(and every branch move before the checkout changes). Installing also takes the folder out of
config.json's `disabled_extensions` (every other key kept).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowvram.core.errors import ApplyError, ExtensionError, UsageError
from lowvram.core.plan import ExtensionSpec
from lowvram.world import fsutil, gitops, paths
from lowvram.world.apply.manifest import Manifest, rel, sha256
from lowvram.world.detect.webui import MAX_CONFIG_BYTES

STATUSES = ("installed", "up-to-date", "updated", "kept", "skipped", "failed")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{40}$")

# Tests (and a packager's own registry) point this at another file; None = the bundled data.
REGISTRY_FILE: Path | None = None


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    url: str
    ref: str
    dir: str
    uis: tuple[str, ...]
    file: str = ""
    why: str = ""
    skip: tuple[tuple[str, str], ...] = ()

    def skip_reason(self, ui: str) -> str | None:
        if ui in self.uis:
            return None
        reasons = dict(self.skip)
        return reasons.get(ui) or f"{self.name} does not work on {ui} (it works on {', '.join(self.uis)})"

    def spec(self) -> ExtensionSpec:
        return ExtensionSpec(name=self.name, url=self.url, ref=self.ref, dir=self.dir, reason=self.why,
                             uis=self.uis, skip=self.skip)


@dataclass(frozen=True)
class ExtensionResult:
    name: str
    dir: str
    url: str
    ref: str
    status: str
    reason: str = ""
    commit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dir_for_url(url: str) -> str:
    """A1111's installer's rule: the URL's last segment without .git."""
    last = url.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return last[:-4] if last.endswith(".git") else last


def check_safe_dir(name: str, what: str = "extension folder") -> str:
    """A folder name that stays inside extensions/: no separators, no '..', not absolute."""
    if not name or not _SAFE_NAME.match(name) or name in (".", "..") or ".." in name:
        raise ExtensionError(
            f"refusing {what} name {name!r}: it could escape the extensions/ folder",
            "use a plain folder name (letters, digits, '.', '_', '-')",
        )
    return name


def load_registry(path: Path | None = None) -> dict[str, RegistryEntry]:
    """The registry kept as data (lowvram/data/extensions.json), validated."""
    path = path or REGISTRY_FILE or paths.data_file("extensions.json")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExtensionError(f"cannot read the extension registry {path}: {exc}", "reinstall lowvram") from exc
    raw = data.get("extensions") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raise ExtensionError(f"the extension registry {path} has no `extensions` table", "reinstall lowvram")
    out: dict[str, RegistryEntry] = {}
    for name, e in raw.items():
        if not isinstance(e, dict):
            raise ExtensionError(f"registry entry {name!r} is not an object", "reinstall lowvram")
        try:
            url, ref = str(e["url"]), str(e["ref"])
        except KeyError as exc:
            raise ExtensionError(f"registry entry {name!r} lacks {exc}", "reinstall lowvram") from exc
        skip = e.get("skip") or {}
        out[name] = RegistryEntry(
            name=check_safe_dir(name, "extension"),
            url=url,
            ref=ref,
            dir=check_safe_dir(str(e.get("dir") or dir_for_url(url))),
            uis=tuple(str(u) for u in e.get("uis") or ()),
            file=str(e.get("file") or ""),
            why=str(e.get("why") or ""),
            skip=tuple((str(k), str(v)) for k, v in skip.items()) if isinstance(skip, dict) else (),
        )
    return out


def registry_specs() -> dict[str, ExtensionSpec]:
    """The registry as the policy wants it: name → ExtensionSpec."""
    return {name: entry.spec() for name, entry in load_registry().items()}


def parse_sources(values: Sequence[str]) -> dict[str, str]:
    """`--source NAME=URL` values → {NAME: URL} (URL validated)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise UsageError(f"--source {value!r} is not NAME=URL", "e.g. --source vram-estimator=/srv/mirror/vram-estimator")
        out[name] = gitops.validate_source_url(url)
    return out


def resolve_names(names: Sequence[str], registry: Mapping[str, RegistryEntry]) -> list[RegistryEntry]:
    entries: list[RegistryEntry] = []
    for name in names:
        entry = registry.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(registry), n=1)
            hint = f"did you mean {close[0]}?" if close else "known: " + ", ".join(sorted(registry))
            raise UsageError(f"unknown extension {name!r}", hint)
        if entry not in entries:
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------
# Finding what is already there


def _checkouts(ext_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in ext_dir.iterdir() if p.is_dir() and fsutil.TEMP_MARK not in p.name
                      and gitops.is_git_repo(p))
    except OSError:
        return []


def find_installed(ext_dir: Path, urls: Sequence[str]) -> Path | None:
    """The checkout under extensions/ whose origin is one of `urls` (normalised)."""
    wanted = {gitops.normalise_url(u) for u in urls}
    for path in _checkouts(ext_dir):
        remote = gitops.origin_url(path)  # no git command: another user's checkout is still recognised
        if remote and gitops.normalise_url(remote) in wanted:
            return path
    return None


# ---------------------------------------------------------------------------------------------
# config.json


def _detect_indent(text: str) -> int | None:
    m = re.search(r"\n([ \t]+)\"", text)
    if not m:
        return None
    return len(m.group(1).expandtabs(4)) or None


def enable_in_config(webui: Path, dirs: Sequence[str], manifest: Manifest, *, dry_run: bool = False) -> list[str]:
    """Take `dirs` out of config.json `disabled_extensions`, keeping every other key and value.

    Returns the names taken out. A config.json that is not a JSON object is left alone.
    """
    path = Path(webui) / "config.json"
    raw = fsutil.read_regular_bytes(path, MAX_CONFIG_BYTES, "UI settings file")  # never blocks on a FIFO
    if raw is None:
        return []
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    disabled = data.get("disabled_extensions")
    if not isinstance(disabled, list):
        return []
    removed = [d for d in disabled if isinstance(d, str) and d in dirs]
    if removed:  # refused (before any clone, from preflight's dry run) where it leads out of the tree
        real = fsutil.write_target(path, webui, "UI settings file")  # a link inside the tree stays a link
    if not removed or dry_run:
        return removed
    data["disabled_extensions"] = [d for d in disabled if not (isinstance(d, str) and d in dirs)]
    new_text = json.dumps(data, indent=_detect_indent(text), ensure_ascii=text.isascii())
    if text.endswith("\n"):
        new_text += "\n"
    new = new_text.encode("utf-8")
    key = rel(manifest.webui, path)
    entry = manifest.config_keys.setdefault(key, {})
    changes = entry.setdefault("disabled_extensions", {"removed": []})
    changes["removed"] = sorted(set(changes.get("removed", [])) | set(removed))
    manifest.record_file(path, raw, new)
    manifest.save()
    fsutil.atomic_write_bytes(real, new)
    return removed


# ---------------------------------------------------------------------------------------------
# Installing


def _result(entry: RegistryEntry, status: str, reason: str = "", directory: str | None = None,
            commit: str | None = None) -> ExtensionResult:
    return ExtensionResult(name=entry.name, dir=directory or entry.dir, url=entry.url, ref=entry.ref,
                           status=status, reason=reason, commit=commit)


def install_one(webui: Path, entry: RegistryEntry, manifest: Manifest, *, ui: str,
                sources: Mapping[str, str] | None = None, update: bool = False,
                progress: gitops.Progress | None = None, dry_run: bool = False) -> ExtensionResult:
    """Install (or check, or update) one registry entry. Failures come back as status "failed"."""
    webui = Path(webui)
    ext_dir = webui / "extensions"
    skip = entry.skip_reason(ui)
    if skip:
        return _result(entry, "skipped", skip)
    try:
        check_safe_dir(entry.dir)
        gitops.validate_source_url(entry.url)
        source = gitops.source_for(entry.name, entry.url, sources)
        existing = find_installed(ext_dir, [entry.url, source])
        if existing is not None:
            return _existing(webui, entry, existing, manifest, source=source, update=update, dry_run=dry_run)
        dest = ext_dir / entry.dir
        if dest.exists() or dest.is_symlink():
            why = "is not a git checkout"
            if gitops.is_git_repo(dest):
                remote = gitops.origin_url(dest)
                why = f"is a clone of {remote}" if remote else "has no origin remote"
            return _result(entry, "kept", f"extensions/{entry.dir} {why}, not of {entry.url}: left as it is; "
                                          "move it away to let lowvram install the pinned version")
        _inside_tree(webui, ext_dir)
        if dry_run:
            return _result(entry, "installed", f"would clone {source} at {entry.ref[:12]} (dry run)")
        if not ext_dir.exists():
            manifest.record_dir_created(ext_dir)
            manifest.save()
            ext_dir.mkdir(parents=True, exist_ok=True)

        def record(commit: str) -> None:
            manifest.record_extension(entry.name, {"dir": entry.dir, "url": entry.url, "ref": entry.ref,
                                                   "commit": commit, "source": source, "action": "installed"})
            manifest.save()

        origin = entry.url if gitops.normalise_url(source) != gitops.normalise_url(entry.url) else None
        commit = gitops.clone_pinned(source, entry.ref, dest, origin_url=origin, progress=progress,
                                     before_rename=record)
        reason = f"cloned from {source}" if origin else ""
        return _result(entry, "installed", reason, commit=commit)
    except gitops.GitSetupError:
        raise  # git cannot work here at all: one line for the whole command (see preflight)
    except ExtensionError as exc:
        reason = exc.message + (f" ({exc.hint})" if exc.hint else "")
        return _result(entry, "failed", reason)


def _inside_tree(webui: Path, path: Path) -> None:
    """Refuse (one line, before anything is written) where extensions/ is a link out of the tree, a
    dangling link or not a folder: lowvram never changes anything a link leads to outside it."""
    ext = Path(webui) / "extensions"
    fsutil.writable_folder(ext, webui, "extensions folder")
    if not fsutil.is_inside(path, webui):
        raise ApplyError(f"{path} lies outside the WebUI folder: lowvram never changes anything there",
                         "move it back into the WebUI folder")


def _existing(webui: Path, entry: RegistryEntry, path: Path, manifest: Manifest, *, source: str,
              update: bool, dry_run: bool) -> ExtensionResult:
    state = gitops.repo_state(path)
    name = path.name
    if state.head and state.head == entry.ref:
        return _at_pin(entry, path, state, manifest, source=source, update=update, dry_run=dry_run)
    at = (state.head or "no commit")[:12]
    if not update:
        return _result(entry, "kept", f"extensions/{name} is at {at}, lowvram pins {entry.ref[:12]}; "
                                      f"run `lowvram install-extensions --update {entry.name}` to move it", name,
                       state.head)
    if state.dirty or gitops.has_untracked(path):
        return _result(entry, "kept", f"extensions/{name} has local changes; left at {at} (commit or stash them, "
                                      "or move the folder away, then run with --update again)", name, state.head)
    _inside_tree(webui, path)
    if dry_run:
        return _result(entry, "updated", f"would move {at} to {entry.ref[:12]} (dry run)", name, state.head)
    commit = gitops.fetch_commit(path, source, entry.ref)
    if gitops.head_would_lose(path, commit):
        return _result(entry, "kept", f"extensions/{name} is detached at {at}, on commits no branch holds; left "
                                      "as it is (put them on a branch, then run with --update again)", name,
                       state.head)
    previous = manifest.extensions.get(entry.name, {})
    record = {"dir": name, "url": entry.url, "ref": entry.ref, "commit": commit, "source": source,
              "action": previous.get("action", "updated"),
              "updated_from": previous.get("updated_from", state.head),
              "updated_from_branch": previous.get("updated_from_branch", state.branch),
              "branches": previous.get("branches", {})}
    if record["action"] == "installed":
        for key in ("updated_from", "updated_from_branch", "branches"):
            record.pop(key)
    move = gitops.put_on_branch(path, commit, before_change=_recorder(manifest, entry.name, record, commit))
    return _result(entry, "updated", f"moved from {at} (on branch {move.name})", name, commit)


def _recorder(manifest: Manifest, key: str, record: dict[str, Any],
              commit: str) -> Callable[[gitops.BranchMove], None]:
    """The before_change of gitops.put_on_branch: records the move (and the branch it sets, for revert)
    in the manifest before the checkout changes."""

    def save(move: gitops.BranchMove) -> None:
        if record.get("action") != "installed":
            branches = {k: dict(v) for k, v in (record.get("branches") or {}).items() if isinstance(v, dict)}
            earlier = branches.get(move.name)
            before = earlier.get("before") if earlier and earlier.get("set") == move.before else move.before
            branches[move.name] = {"set": commit, "before": before}
            record["branches"] = branches
        manifest.record_extension(key, record)
        manifest.save()

    return save


def _at_pin(entry: RegistryEntry, path: Path, state: gitops.RepoState, manifest: Manifest, *, source: str,
            update: bool, dry_run: bool) -> ExtensionResult:
    """A checkout at the pin: up to date, and put on a branch when detached (A1111 cannot read it
    otherwise) where lowvram made it so, or where --update asks."""
    name, head = path.name, str(state.head)
    if state.branch is not None:
        return _result(entry, "up-to-date", "", name, head)
    previous = manifest.extensions.get(entry.name)
    ours = isinstance(previous, dict) and previous.get("dir") == name and previous.get("commit") == head
    if not (ours or update):
        return _result(entry, "up-to-date", f"extensions/{name} is on a detached HEAD, so A1111 shows no branch or "
                                            f"version for it; `lowvram install-extensions --update {entry.name}` "
                                            "puts it on a branch", name, head)
    if dry_run:
        return _result(entry, "up-to-date", "would put it on a branch (dry run)", name, head)
    record: dict[str, Any] = dict(previous) if ours and isinstance(previous, dict) else {
        "dir": name, "url": entry.url, "ref": entry.ref, "commit": head, "source": source, "action": "updated",
        "updated_from": head, "updated_from_branch": None}
    move = gitops.put_on_branch(path, head, before_change=_recorder(manifest, entry.name, record, head))
    return _result(entry, "up-to-date", f"put on branch {move.name} (it was detached; A1111 cannot read that)",
                   name, head)


def install(webui: Path, entries: Sequence[RegistryEntry], manifest: Manifest, *, ui: str,
            sources: Mapping[str, str] | None = None, update: bool = False,
            progress: gitops.Progress | None = None, dry_run: bool = False) -> list[ExtensionResult]:
    """Install each entry, then make sure the ones now present are enabled in config.json."""
    results = [install_one(webui, e, manifest, ui=ui, sources=sources, update=update, progress=progress,
                           dry_run=dry_run) for e in entries]
    enable = [r.dir for r in results if r.status in ("installed", "up-to-date", "updated")]
    if enable:
        removed = enable_in_config(webui, enable, manifest, dry_run=dry_run)
        if removed:
            again = "would be enabled again in config.json (dry run)" if dry_run else "enabled again in config.json"
            results = [
                ExtensionResult(**{**r.to_dict(), "reason": _join(r.reason, again)})
                if r.dir in removed else r
                for r in results
            ]
    return results


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


NO_EXTENSIONS_HINT = "or use a profile that lists none (--profile with a profile of yours saying `extensions: []`)"


def require_git_for(entries: Sequence[RegistryEntry], *, ui: str) -> bool:
    """GitMissingError (one line, how to install git) when an entry works on `ui` and git is not
    there; False when none does (nothing to install, no git needed)."""
    wanted = [e for e in entries if e.skip_reason(ui) is None]
    if not wanted:
        return False
    names = ", ".join(e.name for e in wanted)
    try:
        gitops.require_git(f"to install the extensions {names}")
    except gitops.GitMissingError as exc:
        raise gitops.GitMissingError(exc.message, f"{exc.hint}; {NO_EXTENSIONS_HINT}") from exc
    return True


def preflight(webui: Path, entries: Sequence[RegistryEntry], manifest: Manifest, *, ui: str,
              sources: Mapping[str, str] | None = None, update: bool = False) -> list[Path]:
    """What `install` would need, found without changing anything: the folders it would write in.

    Raises before the first write when git cannot be used at all (GitMissingError: not installed;
    GitOwnershipError: a checkout another user owns), so a refused run leaves the tree as it was.
    """
    if not require_git_for(entries, ui=ui):
        return []
    planned = install(webui, entries, manifest, ui=ui, sources=sources, update=update, dry_run=True)
    ext_dir = Path(webui) / "extensions"
    folders: list[Path] = []
    by_name = {e.name: e for e in entries}
    for r in planned:
        checkout = ext_dir / r.dir
        if r.status == "installed":
            gitops.check_source(gitops.source_for(r.name, by_name[r.name].url, sources))
            folders.append(ext_dir)
        elif r.status == "updated" or "would put it on a branch" in r.reason:
            folders.append(checkout / ".git")  # (not the work tree: a probe left there would be the user's file)
        if "enabled again in config.json" in r.reason:
            folders.append(Path(webui) / "config.json")
    return folders


# ---------------------------------------------------------------------------------------------
# Revert


def remove_installed(webui: Path, name: str, entry: Mapping[str, Any]) -> tuple[str, str]:
    """Undo one manifest extension record. Returns (status, reason): removed | restored | kept | gone."""
    directory = entry.get("dir")
    if not isinstance(directory, str):
        return "gone", "the manifest names no folder"
    try:
        check_safe_dir(directory)
    except ExtensionError as exc:
        return "kept", exc.message
    path = Path(webui) / "extensions" / directory
    if not path.exists():
        return "gone", f"extensions/{directory} is not there"
    if path.is_symlink() or not fsutil.is_inside(path, webui):
        return "kept", f"extensions/{directory} is a link or lies outside the WebUI folder now; left as it is"
    try:
        state = gitops.repo_state(path)
    except ExtensionError:
        return "kept", f"extensions/{directory} is no longer a git checkout; left as it is"
    if state.dirty or state.user_files:
        what = "local changes" if state.dirty else f"files git does not track ({', '.join(state.user_files[:3])})"
        return "kept", f"extensions/{directory} has {what}; left in place (remove it yourself if you want)"
    if state.head != entry.get("commit"):
        return "kept", f"extensions/{directory} was moved to another commit since; left in place"
    if entry.get("action") == "installed":
        own = gitops.unpublished_branches(path, str(state.head))
        if own:
            return "kept", (f"extensions/{directory} has commits of yours on no remote ({', '.join(own[:3])}); "
                            "left in place (remove it yourself if you want)")
        tmp = fsutil.temp_name(path)
        path.rename(tmp)  # one rename: a kill leaves either the checkout or a stale temp
        fsutil.kill_point("revert:extension:after-rename")
        fsutil.remove_tree(tmp)
        return "removed", ""
    previous = entry.get("updated_from")
    if isinstance(previous, str) and _SHA.match(previous):
        branch = entry.get("updated_from_branch")
        branches = entry.get("branches")
        on = gitops.put_back(path, previous, branch if isinstance(branch, str) and branch else None,
                             branches if isinstance(branches, dict) else {})
        return "restored", f"moved back to {on} ({previous[:12]})" if on else f"moved back to {previous[:12]}"
    return "kept", "it was there before lowvram"


def revert_preflight(webui: Path, recorded: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Before revert changes anything: the folders removing or moving back the extensions the
    manifest records would write in. Raises GitMissingError/GitOwnershipError when git cannot
    check them for the user's changes (a checkout is never removed unchecked)."""
    present = []
    for entry in recorded.values():
        directory = entry.get("dir")
        if isinstance(directory, str) and _SAFE_NAME.match(directory) and ".." not in directory:
            path = Path(webui) / "extensions" / directory
            if path.exists():
                present.append(path)
    if not present:
        return []
    gitops.require_git("to check the extensions it installed for your changes before taking them out")
    for path in present:
        try:
            gitops.repo_state(path)
        except gitops.GitSetupError:
            raise
        except ExtensionError:
            continue  # no longer a checkout: revert keeps it, and says so
    return [Path(webui) / "extensions", *(p / ".git" for p in present)]


def config_put_back(webui: Path, key: str, changes: Mapping[str, Any]) -> bool:
    """Put the names lowvram took out of `disabled_extensions` back (the user's other edits stay)."""
    path = Path(webui) / key
    try:
        raw = fsutil.read_regular_bytes(path, MAX_CONFIG_BYTES, "UI settings file")
        text = (raw or b"").decode("utf-8")
        data = json.loads(text)
    except (fsutil.UnsafeFileError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    removed = (changes.get("disabled_extensions") or {}).get("removed") or []
    if not isinstance(data, dict) or not removed:
        return False
    disabled = data.get("disabled_extensions")
    disabled = list(disabled) if isinstance(disabled, list) else []
    missing = [n for n in removed if n not in disabled]
    if not missing:
        return False
    data["disabled_extensions"] = disabled + missing
    new_text = json.dumps(data, indent=_detect_indent(text), ensure_ascii=text.isascii())
    if text.endswith("\n"):
        new_text += "\n"
    fsutil.atomic_write_bytes(path, new_text.encode("utf-8"), within=Path(webui))
    return True


__all__ = ["STATUSES", "ExtensionResult", "RegistryEntry", "enable_in_config", "find_installed", "install",
           "load_registry", "parse_sources", "registry_specs", "remove_installed", "resolve_names", "sha256"]
