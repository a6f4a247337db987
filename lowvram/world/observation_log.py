"""The observations file on disk (the edge): read back and appended to here, so `observations.py` stays pure."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from lowvram.core.errors import ObservationError
from lowvram.core.observations import (
    LoadedObservations,
    Observation,
    OtherTreeRuns,
    encode_line,
    gpu_uuid_key,
    model_evidence,
    parse_observations,
)
from lowvram.world.fsutil import special_kind

# Reading stops looking further back than this: the reserve uses the last 5 runs, tuning the last
# few dozen, and a plan must stay fast however long the UI has been used.
MAX_READ_BYTES = 32 * 1024 * 1024


def load_observations(path: Path, *, max_bytes: int = MAX_READ_BYTES) -> LoadedObservations:
    """Read every line that parses; name each line that does not (by its number) in a warning.

    A missing file is no observations. An unreadable one is a warning too: a plan must still be
    made, it will just say it is learning.
    """
    path = Path(path)
    try:  # the type before opening: a FIFO would block the open, /dev/zero would never end
        kind = special_kind(os.stat(path).st_mode)
    except OSError:
        kind = None  # missing or unreadable: the open below says which
    if kind is not None and kind != "a folder":
        return LoadedObservations((), (f"{path} is {kind}, not an observations file; ignored",))
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            skipped_head = size > max_bytes
            if skipped_head:
                fh.seek(size - max_bytes)
            raw = fh.read()
    except FileNotFoundError:
        return LoadedObservations((), ())
    except IsADirectoryError:
        return LoadedObservations((), (f"{path} is a directory, not an observations file; ignored",))
    except OSError as exc:
        return LoadedObservations((), (f"cannot read {path}: {exc.strerror or exc}; observations ignored",))
    parsed = parse_observations(raw, str(path), cut=skipped_head)
    if not skipped_head:
        return parsed
    head = f"{path} is over {max_bytes // (1024 * 1024)} MiB: only its most recent lines were read"
    return LoadedObservations(parsed.items, (head, *parsed.warnings))


def append_observation(path: Path, obs: Observation) -> None:
    """Append one line with a single write() on an O_APPEND descriptor (creates the directories)."""
    path = Path(path)
    try:
        line = encode_line(obs)
    except ValueError as exc:  # NaN/inf in a float field
        raise ObservationError(f"cannot record an observation: {exc}", "report this as a bug") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ObservationError(
            f"cannot record the observation in {path}: {exc.strerror or exc}",
            "check that lowvram's state directory is writable (LOWVRAM_HOME moves it)",
        ) from exc
    if written != len(line):
        raise ObservationError(f"the observation written to {path} was cut short ({written} of {len(line)} bytes)",
                               "check the free disk space; the next read skips the partial line")


# ---- what other WebUI trees learnt about this model on this GPU (issue 19 item 5) -----------------------

MAX_OTHER_TREES = 16  # other trees' files read per plan or estimate, the most recently written first
MAX_SCANNED = 256  # state folders looked at to find them
MAX_OTHER_BYTES = 2 * 1024 * 1024  # of each file, only the most recent lines
MAX_OTHER_RUNS = 40  # runs taken from each tree, the most recent
MAX_HOOK_JSON = 64 * 1024


@dataclass(frozen=True)
class ThisModel:
    """What another tree's run must match: this GPU and this model file's content."""

    model_key: str  # markers.content_key of the model file
    size: int  # its size in bytes (a hook record's checkpoint key says the size of its file)
    gpu_uuid: str | None  # this GPU's UUID (NVML)
    sole_gpu_mb: int | None = None  # this machine's only NVIDIA GPU's size: a record with no UUID may match it


def _same_gpu(obs: Observation, this: ThisModel) -> bool:
    mine, theirs = gpu_uuid_key(this.gpu_uuid), gpu_uuid_key(obs.gpu_uuid)
    if mine and theirs:
        return mine == theirs
    # No UUID in the record (the hook on torch < 2.2): only where this machine has one NVIDIA GPU, and the
    # record's card is that size (torch's total is NVML's less what the driver keeps, a few per cent).
    sole, total = this.sole_gpu_mb, obs.vram_total_mb
    return sole is not None and total is not None and 0.9 * sole <= total <= sole + 64


def _tree_of(state: Path) -> tuple[str | None, str | None, str]:
    """(flavor, path, title) of the tree a state folder belongs to, from the hook config apply wrote there."""
    import json

    from lowvram.ui import adapter
    from lowvram.world.detect.webui import detect_flavor

    try:
        with open(state / "hook.json", "rb") as fh:
            data = json.loads(fh.read(MAX_HOOK_JSON + 1)[:MAX_HOOK_JSON].decode("utf-8"))
        webui = data.get("webui") if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        webui = None
    if not isinstance(webui, str) or not webui:
        return None, None, "another WebUI"
    flavor = detect_flavor(Path(webui))
    return flavor, webui, adapter(flavor).title if flavor else "another WebUI"


def _file_matches(webui: str | None, checkpoint: str | None, this: ThisModel, cache: dict[str, bool]) -> bool:
    """A hook record names its file name|size|mtime: find that file in its tree and compare its content key."""
    from lowvram.core.errors import LowvramError
    from lowvram.world.detect.checkpoint import content_key
    from lowvram.world.detect.webui import _walk_checkpoints, checkpoint_dirs

    if not checkpoint or webui is None:
        return False
    if checkpoint in cache:
        return cache[checkpoint]
    name, _, rest = checkpoint.partition("|")
    size, _, mtime = rest.partition("|")
    found = False
    if size == str(this.size):  # another size is another file: nothing to read
        for _d, f in _walk_checkpoints(checkpoint_dirs(Path(webui), ())):
            try:
                st = os.stat(f)
                if f.name == name and st.st_size == this.size and str(int(st.st_mtime)) == mtime:
                    found = content_key(f) == this.model_key
                    break
            except (OSError, LowvramError):
                break
    cache[checkpoint] = found
    return found


def _state_folders(webuis: Path, own: Path | None) -> list[Path]:
    """The other trees' state folders holding observations, the most recently written first (bounded)."""
    found: list[tuple[float, Path]] = []
    try:
        with os.scandir(webuis) as it:
            for n, entry in enumerate(it):
                if n >= MAX_SCANNED:
                    break
                folder = Path(entry.path)
                if own is not None and folder.name == own.name:
                    continue
                try:
                    found.append((os.stat(folder / "observations.jsonl").st_mtime, folder))
                except OSError:
                    continue
    except OSError:
        return []
    return [f for _t, f in sorted(found, key=lambda tf: -tf[0])][:MAX_OTHER_TREES]


def other_tree_runs(webuis: Path, own: Path | None, this: ThisModel) -> tuple[tuple[OtherTreeRuns, ...], tuple[str, ...]]:
    """What other WebUI trees recorded of this model (same content) on this GPU: runs that are evidence of the
    model's memory (observations.model_evidence), never one UI's knobs. At most MAX_OTHER_TREES files,
    each read back MAX_OTHER_BYTES at most; a damaged or unreadable one is named in a warning and skipped."""
    out: list[OtherTreeRuns] = []
    warnings: list[str] = []
    for folder in _state_folders(webuis, own):
        loaded = load_observations(folder / "observations.jsonl", max_bytes=MAX_OTHER_BYTES)
        warnings.extend(f"another WebUI's observations: {w}" for w in loaded.warnings)
        candidates = [o for o in loaded.items if model_evidence(o) and _same_gpu(o, this)]
        if not candidates:
            continue
        flavor, webui, title = _tree_of(folder)
        cache: dict[str, bool] = {}
        runs = [replace(o, ui=flavor) for o in candidates
                if o.model_key == this.model_key or (o.model_key is None and _file_matches(webui, o.checkpoint,
                                                                                            this, cache))]
        if runs:
            out.append(OtherTreeRuns(flavor, title, webui, tuple(runs[-MAX_OTHER_RUNS:])))
    return tuple(out), tuple(warnings)
