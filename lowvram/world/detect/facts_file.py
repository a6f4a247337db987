"""Reading a facts file (`--facts FILE`, $LOWVRAM_FACTS) from disk: the edge, so `facts.py` only parses."""

from __future__ import annotations

from pathlib import Path

from lowvram.core.errors import FactsError
from lowvram.core.facts import Facts, facts_from_json
from lowvram.world.fsutil import UnsafeFileError, read_regular_bytes

MAX_FACTS_BYTES = 4 * 1024 * 1024


def load_facts_file(path: Path) -> Facts:
    """Read the JSON `doctor --json` printed (here or on another machine); damage is one FactsError."""
    path = Path(path)
    try:
        raw = read_regular_bytes(path, MAX_FACTS_BYTES, "facts file")
    except UnsafeFileError as exc:
        raise FactsError(exc.message, exc.hint) from exc
    if raw is None:
        raise FactsError(f"facts file {path} does not exist", "run `lowvram doctor --json > facts.json` first")
    return facts_from_json(raw, str(path))
