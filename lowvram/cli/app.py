"""The typer application, global options, and the one place errors are turned into output.

Each command is a plain function in its own module under lowvram/cli/ (`cmd_*.py`); this module
creates `app` and registers them (pipx's main.py: it only parses and dispatches). The import runs
one way: app.py imports the command modules, and they never import app.py (what they share with it
is in common.py and options.py). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lowvram import __version__
from lowvram.cli.cmd_apply import apply_cmd, revert_cmd
from lowvram.cli.cmd_doctor import HELP as DOCTOR_HELP
from lowvram.cli.cmd_doctor import doctor
from lowvram.cli.cmd_estimate import estimate_command
from lowvram.cli.cmd_extensions import install_extensions
from lowvram.cli.cmd_launch import HELP as LAUNCH_HELP
from lowvram.cli.cmd_launch import launch_cmd
from lowvram.cli.cmd_plan import plan_command
from lowvram.cli.cmd_profiles import profiles_app
from lowvram.cli.cmd_reserve import reserve_cmd
from lowvram.cli.cmd_setup import HELP as SETUP_HELP
from lowvram.cli.cmd_setup import setup_command
from lowvram.cli.cmd_tune import HELP as TUNE_HELP
from lowvram.cli.cmd_tune import tune_cmd
from lowvram.cli.common import DEBUG_HELP, debug_enabled, prepare_commands, report_error, set_debug, wants_json
from lowvram.core.errors import LowvramError

# --help lists the commands in the order a new user needs them.
COMMAND_ORDER = ("doctor", "profiles", "plan", "apply", "launch", "revert", "install-extensions", "reserve",
                 "estimate", "tune", "setup")


class _OrderedGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        prepare_commands(self)

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

# The commands, in COMMAND_ORDER (which, not this, orders --help). A command without `help=` takes its docstring.
app.command("doctor", help=DOCTOR_HELP, no_args_is_help=False)(doctor)
app.add_typer(profiles_app, name="profiles")
app.command("plan")(plan_command)
app.command("apply")(apply_cmd)
app.command("launch", help=LAUNCH_HELP)(launch_cmd)
app.command("revert")(revert_cmd)
app.command("install-extensions")(install_extensions)
app.command("reserve")(reserve_cmd)
app.command("estimate")(estimate_command)
app.command("tune", help=TUNE_HELP)(tune_cmd)
app.command("setup", help=SETUP_HELP)(setup_command)


def _version_callback(value: bool) -> None:
    if value:
        print(f"lowvram {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    if debug:  # never back to False here: main() resets it per run
        set_debug(True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn a LowvramError into one line and a hint, return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere before a `--` (after which the arguments are the UI's), for errors raised before
    # the command's own --debug is parsed; reset on every call, so one run's --debug never leaks to the next.
    set_debug("--debug" in (args[: args.index("--")] if "--" in args else args))
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
        report_error(exc, wants_json(args))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_enabled():
            raise
        from lowvram.cli import render

        render.error(
            f"unexpected error: {type(exc).__name__}: {exc}",
            "run again with --debug for the traceback, and report it",
            as_json=wants_json(args),
        )
        return 1
    return 0


__all__ = ["COMMAND_ORDER", "app", "debug_enabled", "main", "report_error"]
