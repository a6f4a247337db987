"""Shared output helpers for the CLI layer: JSON envelopes, error lines, colour, plain tables.

Only lowvram/cli/ and this module print. Colour follows NO_COLOR / FORCE_COLOR / isatty().
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

_STYLES = {
    "ok": "32",
    "warn": "33",
    "fail": "31",
    "skip": "2",
    "bold": "1",
    "dim": "2",
    "hint": "36",
}


def use_colour(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(stream, "isatty", lambda: False)())


def style(text: str, name: str, stream: TextIO | None = None) -> str:
    code = _STYLES.get(name)
    if not code or not use_colour(stream):
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def emit_json(obj: Any) -> None:
    """Print one JSON document (the `--json` contract: `schema` first)."""
    if isinstance(obj, dict) and "schema" in obj:
        obj = {"schema": obj["schema"], **{k: v for k, v in obj.items() if k != "schema"}}
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def error(message: str, hint: str = "", as_json: bool = False) -> None:
    """One line and a hint on stderr; with --json also the error envelope on stdout."""
    if as_json:
        emit_json({"schema": 1, "error": {"message": message, "hint": hint}})
    print(style("error:", "fail", sys.stderr) + " " + message, file=sys.stderr)
    if hint:
        print(style("hint:", "hint", sys.stderr) + " " + hint, file=sys.stderr)


def warn(message: str) -> None:
    print(style("warning:", "warn", sys.stderr) + " " + message, file=sys.stderr)


def note(message: str) -> None:
    print(style(message, "dim", sys.stderr), file=sys.stderr)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], styles: Sequence[str | None] | None = None) -> str:
    """A plain aligned table; `styles[i]` colours row i (e.g. by check status)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        if n == 0:
            line = style(line, "bold")
        elif styles and styles[n - 1]:
            line = style(line, styles[n - 1] or "")
        lines.append(line)
    return "\n".join(lines)
