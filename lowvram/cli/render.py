"""Shared output helpers for the CLI layer: JSON envelopes, error lines, colour, tables, wrapping.

Only lowvram/cli/ and this module print. Colour follows NO_COLOR / FORCE_COLOR / isatty(). Screens fit
the width `screen_width()` gives (COLUMNS, else the terminal's, else 80 when piped): tables are rich
tables whose cells wrap at word boundaries, prose lines wrap with `wrap()`. JSON is never wrapped.
rich is imported only when a table is drawn, so `--help` and the JSON paths never load it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

DEFAULT_WIDTH = 80  # piped output without COLUMNS
MIN_WIDTH = 20  # narrower than this, screens are laid out for 20 columns and the terminal wraps them

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


def _to_stderr(label: str, message: str, name: str) -> None:
    """`label message` on stderr: wrapped at word boundaries on a terminal; one line each where stderr is
    a file or a pipe (a log, a script reading the error), whatever its length."""
    text = f"{label} {message}" if label else message
    if _isatty(sys.stderr):
        text = wrap(text, hang=len(label) + 1 if label else 2, width=screen_width(sys.stderr))
    if label and text.startswith(label):
        text = style(label, name, sys.stderr) + text[len(label):]
    elif not label:
        text = style(text, name, sys.stderr)
    print(text, file=sys.stderr)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def error(message: str, hint: str = "", as_json: bool = False) -> None:
    """One line and a hint on stderr; with --json also the error envelope on stdout."""
    if as_json:
        emit_json({"schema": 1, "error": {"message": message, "hint": hint}})
    _to_stderr("error:", message, "fail")
    if hint:
        _to_stderr("hint:", hint, "hint")


def warn(message: str) -> None:
    _to_stderr("warning:", message, "warn")


def note(message: str) -> None:
    _to_stderr("", message, "dim")


@dataclass(frozen=True)
class Cell:
    """A table cell with a style of its own (a `_STYLES` name), e.g. a check's status."""

    text: str
    style: str | None = None


_RICH_STYLES = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim", "bold": "bold", "dim": "dim",
                "hint": "cyan"}
_TRAILING_SPACE = re.compile(r"[ ]+((?:\x1b\[[0-9;]*m)*)$")


def screen_width(stream: TextIO | None = None) -> int:
    """The columns a screen may use: COLUMNS when set, else the terminal's width, else 80 (piped output)."""
    stream = stream or sys.stdout
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return max(int(columns), MIN_WIDTH)
    try:
        if stream.isatty():
            return max(os.get_terminal_size(stream.fileno()).columns or DEFAULT_WIDTH, MIN_WIDTH)
    except (AttributeError, OSError, ValueError):
        pass
    return DEFAULT_WIDTH


def wrap(text: str, hang: int | None = None, width: int | None = None) -> str:
    """`text` wrapped at word boundaries to the screen; continuation lines indented by `hang` spaces
    (default: the text's own indent + 2). Words are never split, not even at hyphens: a word longer
    than the line (a path, a URL) stays whole on a line of its own."""
    width = width or screen_width()
    if hang is None:
        hang = len(text) - len(text.lstrip(" ")) + 2
    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip(" "))
        out.extend(textwrap.wrap(line.lstrip(" "), width=width, initial_indent=" " * indent,
                                 subsequent_indent=" " * min(hang, width // 2),
                                 break_long_words=False, break_on_hyphens=False) or [""])
    return "\n".join(out)


def lead(label: str, text: str, name: str, hang: int | None = None, sep: str = " ") -> str:
    """`label` styled as `name` (e.g. "warning:" in yellow), then `text`, wrapped to the screen as one line."""
    wrapped = wrap(label + sep + text if text else label, hang=hang)
    if not wrapped.startswith(label):  # the label itself was wrapped (a long path in it): left plain
        return wrapped
    indent = len(label) - len(label.lstrip(" "))
    return label[:indent] + style(label[indent:], name) + wrapped[len(label):]


def _text(value: Any) -> str:
    return value.text if isinstance(value, Cell) else ("" if value is None else str(value))


def _rich_cell(value: Any) -> Any:
    from rich.text import Text

    return Text(_text(value), style=_RICH_STYLES.get(value.style or "", "") if isinstance(value, Cell) else "")


def column_widths(columns: Sequence[Sequence[str]], no_wrap: Sequence[int], room: int) -> list[int] | None:
    """Widths for columns of cell texts sharing `room` columns (two spaces between them): each column at
    least its longest word (a `no_wrap` one its longest line), the space left shared out evenly among
    those still short of their longest line. Where not even the longest words fit (a library path in a
    reason), the column with the longest word gets all the room the others leave, and folds that word
    only. None where rich's own layout will do (everything fits as it is, or nothing sensible does)."""
    from rich.cells import cell_len

    room -= 2 * (len(columns) - 1)
    natural = [max((cell_len(line) for text in col for line in text.split("\n")), default=0) for col in columns]
    least = [natural[i] if i in no_wrap else max((cell_len(w) for text in col for w in text.split()), default=0)
             for i, col in enumerate(columns)]
    if sum(natural) <= room:
        return None
    if sum(least) > room:
        wide = max((i for i in range(len(columns)) if i not in no_wrap), key=lambda i: least[i], default=None)
        if wide is None or room - (sum(least) - least[wide]) < 10:
            return None
        return [room - (sum(least) - least[wide]) if i == wide else w for i, w in enumerate(least)]
    widths, spare = list(least), room - sum(least)
    growing = [i for i in range(len(columns)) if widths[i] < natural[i]]
    while spare > 0 and growing:
        share = max(1, spare // len(growing))
        for i in list(growing):
            give = min(share, natural[i] - widths[i], spare)
            widths[i] += give
            spare -= give
            if widths[i] >= natural[i]:
                growing.remove(i)
    return widths


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], styles: Sequence[str | None] | None = None, *,
          show_header: bool = True, no_wrap: Sequence[int] = (), right: Sequence[int] = (), indent: int = 0,
          width: int | None = None) -> str:
    """A table that fits the screen: columns two spaces apart, no borders, long cells wrapped at word
    boundaries inside their column (which is never narrower than its longest word while the screen allows).
    `styles[i]` colours row i (e.g. by check status); a `Cell` colours one cell; columns in `no_wrap` never
    wrap, columns in `right` are right-aligned; `indent` spaces go before the table."""
    from rich.table import Table

    width = width or screen_width()
    columns = [[_text(row[i]) for row in rows] + ([str(head)] if show_header else []) for i, head in enumerate(headers)]
    widths = column_widths(columns, no_wrap, width - indent)
    grid = Table(box=None, show_header=show_header, header_style="bold", pad_edge=False, padding=(0, 1),
                 show_edge=False, highlight=False)
    for i, head in enumerate(headers):
        grid.add_column(str(head), no_wrap=i in no_wrap, overflow="fold", justify="right" if i in right else "left",
                        width=widths[i] if widths else None)
    for n, row in enumerate(rows):
        row_style = styles[n] if styles else None
        grid.add_row(*(_rich_cell(c) for c in row), style=_RICH_STYLES.get(row_style or "", ""))
    if indent:
        from rich.padding import Padding

        return render_rich(Padding(grid, (0, 0, 0, indent)), width)
    return render_rich(grid, width)


def render_rich(renderable: Any, width: int | None = None) -> str:
    """A rich renderable as text for the screen (`width` or `screen_width()`), colour as `use_colour()` says,
    trailing spaces removed."""
    import io

    from rich.console import Console

    colour = use_colour()
    buf = io.StringIO()
    console = Console(file=buf, width=width or screen_width(), color_system="standard" if colour else None,
                      force_terminal=colour, no_color=not colour, highlight=False, markup=False, emoji=False,
                      legacy_windows=False, force_jupyter=False, force_interactive=False)
    console.print(renderable)
    return "\n".join(_TRAILING_SPACE.sub(r"\1", line) for line in buf.getvalue().rstrip("\n").split("\n"))
