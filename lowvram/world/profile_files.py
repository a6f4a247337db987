"""Profile files: find the bundled and user profiles on disk, read them safely, and load them.

The edge half of profiles (docs/architecture.md#layers-and-import-rules). lowvram/core/profiles.py is
pure core: it parses and validates bytes, merges `extends` chains and selects a profile, but never
touches the disk. This module is where the world comes in: it lists the bundled and user profile
dirs (lowvram.world.paths; a user profile overrides a bundled one by name), reads each file with
fsutil's regular-file and 1 MiB checks, caches what it validated, and hands it to the core.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowvram.core.errors import ProfileError
from lowvram.core.facts import Facts, GpuFacts
from lowvram.core.profiles import (
    MAX_PROFILE_BYTES,
    ProfileInfo,
    ResolvedProfile,
    Selection,
    parse_profile,
    resolve_profile,
)
from lowvram.core.profiles import select_profile as _select_profile
from lowvram.world import paths

_TOO_BIG_HINT = "a profile is a few dozen lines; check you pointed at the right file"


def _profile_files() -> dict[str, tuple[Path, str]]:
    """name → (path, source); user profiles override bundled ones by name."""
    found: dict[str, tuple[Path, str]] = {}
    for directory, source in ((paths.bundled_profiles_dir(), "bundled"), (paths.user_profiles_dir(), "user")):
        try:
            entries = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
        except OSError:
            continue
        for path in entries:
            if path.is_file():
                found[path.stem] = (path, source)
    return found


def _read_bytes(path: Path) -> bytes:
    """One profile file's bytes: a regular file of at most 1 MiB, refused before it is read."""
    from lowvram.world.fsutil import UnsafeFileError, read_regular_bytes

    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_regular_bytes says why
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path}: {size} bytes is over the 1 MiB limit for a profile", _TOO_BIG_HINT)
    try:
        raw = read_regular_bytes(path, MAX_PROFILE_BYTES, "profile")
    except UnsafeFileError as exc:  # a FIFO, a folder, over 1 MiB: refused before it is read
        raise ProfileError(exc.message, _TOO_BIG_HINT) from exc
    if raw is None:
        raise ProfileError(f"cannot read profile {path}: it no longer exists", "check the path")
    return raw


_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _read_validated(path: Path) -> dict[str, Any]:
    """Parse and validate one file; cached by (path, mtime, size) since selection reads them all."""
    try:
        st = path.stat()
        key: tuple[str, int, int] | None = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _CACHE:
        return copy.deepcopy(_CACHE[key])
    data = parse_profile(_read_bytes(path), path)
    if key is not None:
        if len(_CACHE) > 512:
            _CACHE.clear()
        _CACHE[key] = copy.deepcopy(data)
    return data


def load_profile(name: str) -> ResolvedProfile:
    """The named profile with its `extends` chain merged in (unknown name → suggestions)."""
    files = _profile_files()
    return resolve_profile(name, files, lambda current: _read_validated(files[current][0]))


def natural_key(name: str) -> list[str | int]:
    """Numbers compare as numbers, so the VRAM classes list by card size: 2gb, 4gb, … 12gb, 16gb."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def profile_names() -> list[str]:
    """Every profile's name, in list order, without reading a file (shell completion)."""
    return sorted(_profile_files(), key=natural_key)


def _skipped(name: str, exc: ProfileError) -> str:
    return f"profile {name} is skipped: {exc.message}" + (f"; {exc.hint}" if exc.hint else "")


def list_checked() -> tuple[list[ProfileInfo], list[str]]:
    """Every profile (user ones override bundled ones by name) in list order, and one warning per
    file that does not read or validate: an invalid profile stops only what uses it."""
    out, problems = [], []
    for name, (path, source) in sorted(_profile_files().items(), key=lambda item: natural_key(item[0])):
        try:
            raw = _read_validated(path)
        except ProfileError as exc:
            problems.append(_skipped(name, exc))
            continue
        out.append(ProfileInfo(name, raw.get("description", ""), source, str(path), raw.get("extends")))
    return out, problems


def list_profiles() -> list[ProfileInfo]:
    """Every valid profile, in list order (`list_checked` also says which were skipped and why)."""
    return list_checked()[0]


def load_all_checked() -> tuple[list[ResolvedProfile], list[str]]:
    """Every profile that loads (its `extends` chain included), and a warning for each that does not."""
    loaded, problems = [], []
    for name in profile_names():
        try:
            loaded.append(load_profile(name))
        except ProfileError as exc:
            problems.append(_skipped(name, exc))
    return loaded, problems


def load_all() -> list[ResolvedProfile]:
    return load_all_checked()[0]


def select_profile(facts: Facts, family: str | None, candidates: Sequence[ResolvedProfile] | None = None,
                   *, gpu: GpuFacts | None = None, use_largest_gpu: bool = True) -> Selection:
    """`profiles.select_profile` over every profile on disk that loads when no `candidates` are given
    (`load_all_checked` also says which did not)."""
    if candidates is None:
        candidates = load_all()
    return _select_profile(facts, family, candidates, gpu=gpu, use_largest_gpu=use_largest_gpu)
