"""The typer application, global options, and the one place errors are turned into output.

Each command lives in its own module under lowvram/cli/ and registers itself on `app`; the
modules are imported at the bottom of this file. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lowvram import __version__
from lowvram.errors import LowvramError

# --help lists the commands in the order a new user needs them.
COMMAND_ORDER = ("doctor", "profiles", "plan", "apply", "launch", "revert", "install-extensions", "reserve",
                 "estimate", "tune", "setup")


class _OrderedGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))


app = typer.Typer(
    name="lowvram",
    cls=_OrderedGroup,
    help=(
        "Make Stable Diffusion WebUIs (A1111, Forge, SD.Next, ComfyUI) run well on low-VRAM NVIDIA GPUs.\n\n"
        "Start with `lowvram doctor`, then `lowvram plan`, `lowvram apply` or `lowvram launch`."
    ),
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("LOWVRAM_DEBUG", "") not in ("", "0")


def _version_callback(value: bool) -> None:
    if value:
        print(f"lowvram {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (or set LOWVRAM_DEBUG=1).")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    _state["debug"] = debug


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def report_error(exc: LowvramError, as_json: bool) -> None:
    from lowvram import render

    render.error(exc.message, exc.hint, as_json=as_json)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn a LowvramError into one line and a hint, return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args:
        _state["debug"] = True
    try:
        app(args=args, prog_name="lowvram", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except LowvramError as exc:
        if debug_enabled():
            import traceback

            traceback.print_exc()
        report_error(exc, _wants_json(args))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_enabled():
            raise
        from lowvram import render

        render.error(
            f"unexpected error: {type(exc).__name__}: {exc}",
            "run again with --debug for the traceback, and report it",
            as_json=_wants_json(args),
        )
        return 1
    return 0


# Command modules register themselves on `app` (order = order in --help).
from lowvram.cli import (  # noqa: E402
    cmd_apply,
    cmd_doctor,
    cmd_estimate,
    cmd_extensions,
    cmd_launch,
    cmd_plan,
    cmd_profiles,
    cmd_reserve,
    cmd_setup,
    cmd_tune,
)

__all__ = [
    "app",
    "cmd_apply",
    "cmd_doctor",
    "cmd_estimate",
    "cmd_extensions",
    "cmd_launch",
    "cmd_plan",
    "cmd_profiles",
    "cmd_reserve",
    "cmd_setup",
    "cmd_tune",
    "debug_enabled",
    "main",
]
