"""What the command modules share with the app: the --debug switch and the one way an error is shown.

A leaf of lowvram/cli/: it imports nothing from the CLI, so every `cmd_*.py` and `app.py` may import it
(app.py imports the command modules, never the other way round).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowvram.core.errors import LowvramError

_state = {"debug": False}


def set_debug(value: bool) -> None:
    """Remember --debug for this run (set by the root callback and by `main()`)."""
    _state["debug"] = value


def debug_enabled() -> bool:
    """--debug was given, or LOWVRAM_DEBUG is set to anything but 0."""
    return _state["debug"] or os.environ.get("LOWVRAM_DEBUG", "") not in ("", "0")


def wants_json(argv: list[str]) -> bool:
    """--json among the arguments (before a `--`, after which they belong to the UI)."""
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def report_error(exc: LowvramError, as_json: bool) -> None:
    """Print a LowvramError as `error: …` and `hint: …` on stderr (and the JSON error object with --json)."""
    from lowvram.cli import render

    render.error(exc.message, exc.hint, as_json=as_json)
