"""The observations file on disk (the edge): read back and appended to here, so `observations.py` stays pure."""

from __future__ import annotations

import os
from pathlib import Path

from lowvram.core.errors import ObservationError
from lowvram.core.observations import LoadedObservations, Observation, encode_line, parse_observations
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
