"""What the command modules share with the app: the --debug switch, the help layout, and the one way an
error is shown.

A leaf of lowvram/cli/: it imports nothing from the CLI, so every `cmd_*.py` and `app.py` may import it
(app.py imports the command modules, never the other way round).
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowvram.core.errors import LowvramError

DEBUG_HELP = "Show tracebacks (or set LOWVRAM_DEBUG=1)."
_NB_HYPHEN = "\u2011"  # stands for "-" while click wraps help text, so that no word breaks at a hyphen

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


def prepare_commands(group: Any) -> None:
    """Walk the click commands typer built under `group` (the root): every command and group gets `--debug`
    (accepted after the subcommand too: `lowvram plan --debug`), a summary for its group's command list that is
    its whole first sentence (click cuts it at the width with "..."), and a help formatter that wraps at word
    boundaries only (click's breaks `--medvram-sdxl` at its hyphen). Text under a `\\b` line keeps its lines."""
    group.context_class = _help_context(group.context_class)
    for command in getattr(group, "commands", {}).values():
        command.context_class = group.context_class
        if not command.short_help and command.help:
            command.short_help = first_sentence(command.help)
        if not any(getattr(p, "name", None) == "debug" for p in command.params):
            command.params.append(_debug_option())
        if hasattr(command, "commands"):
            prepare_commands(command)


def first_sentence(text: str) -> str:
    """The first sentence of a help text's first paragraph (all of the paragraph if no sentence ends)."""
    words = text.split("\n\n", 1)[0].replace("\b", " ").split()
    for i, word in enumerate(words):
        if word.endswith("."):
            return " ".join(words[: i + 1])
    return " ".join(words)


def _debug_option() -> Any:
    from typer.core import TyperOption

    def on(ctx: Any, param: Any, value: bool) -> None:
        if value:
            set_debug(True)

    return TyperOption(param_decls=["--debug"], is_flag=True, default=False, expose_value=False, is_eager=True,
                       callback=on, help=DEBUG_HELP)


@cache
def _help_context(base: Any) -> Any:
    """`base` (click's Context class, as this typer ships it) with a formatter that keeps hyphenated words whole."""
    if getattr(base, "_lowvram_help", False):
        return base

    class _Formatter(base.formatter_class):  # type: ignore[misc,name-defined]
        def write(self, string: str) -> None:
            super().write(string.replace(_NB_HYPHEN, "-"))

        def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
            super().write_usage(prog, args.replace("-", _NB_HYPHEN), prefix)

        def write_text(self, text: str) -> None:
            super().write_text(text.replace("-", _NB_HYPHEN))

        def write_dl(self, rows: Any, col_max: int = 30, col_spacing: int = 2) -> None:
            rows = [tuple(str(cell).replace("-", _NB_HYPHEN) for cell in row) for row in rows]
            super().write_dl(rows, col_max, col_spacing)

    return type("HelpContext", (base,), {"formatter_class": _Formatter, "_lowvram_help": True})
