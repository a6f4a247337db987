"""`lowvram launch`: plan → apply (block, extensions, hook) → start the UI, exit with its code."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from lowvram.cli import render
from lowvram.cli.options import (
    FactsOpt,
    JsonOpt,
    LayoutOpt,
    ModelOpt,
    OffloadOpt,
    ProfileOpt,
    SysmemOpt,
    UiOpt,
    WebuiOpt,
    overrides_from,
)

EXAMPLES = """
Examples:

\b
  lowvram launch --profile gtx1070-sdxl --webui ~/stable-diffusion-webui
  # plan + exact command, cwd, env; changes nothing
  lowvram launch --dry-run --json
  # extra UI arguments go after --
  lowvram launch -- --port 7861 --listen
"""


HELP = "Apply the plan to the WebUI and start it; exits with the UI's exit code.\n" + EXAMPLES


def launch_cmd(  # noqa: PLR0917 - typer maps parameters to options
    extra: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- EXTRA", help="Arguments for the UI itself, after `--` (validated)."),
    ] = None,
    profile: ProfileOpt = None,
    webui: WebuiOpt = None,
    ui: UiOpt = None,
    model: ModelOpt = None,
    facts: FactsOpt = None,
    offload: OffloadOpt = None,
    layout: LayoutOpt = None,
    sysmem_fallback: SysmemOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and the exact command; change nothing.")] = False,
    no_hook: Annotated[bool, typer.Option("--no-hook", help="Run without the layout hook (LOWVRAM_HOOK=off).")] = False,
    python: Annotated[
        Path | None,
        typer.Option("--python", metavar="PATH",
                     help="Interpreter: ComfyUI's (e.g. the portable python_embeded), or webui.sh's python_cmd."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    from lowvram.world import launch as launch_mod
    from lowvram.world import paths, plan_inputs, state
    from lowvram.world.fsutil import FileLock

    extra_args = tuple(extra or ())
    overrides = overrides_from(profile=profile, ui=ui, model=model, offload=offload, layout=layout,
                               sysmem_fallback=sysmem_fallback, no_hook=no_hook, extra_args=extra_args)
    ctx = plan_inputs.make_plan(webui=webui, facts_file=facts, overrides=overrides)
    spec = launch_mod.build_launch(ctx.plan, ctx.facts, ctx.webui, extra_args=extra_args, python=python,
                                   no_hook=no_hook)
    assert ctx.webui is not None  # build_launch refuses a plan without a WebUI
    tree = Path(ctx.webui)

    if dry_run:
        if as_json:
            render.emit_json({**ctx.plan.to_dict(), "launch": spec.to_dict()})
        else:
            _print_dry_run(ctx.plan, spec)
        return

    launch_mod.check_startable(spec)  # before apply writes anything into the tree
    lock = FileLock(paths.lock_path(tree), what=f"the WebUI at {tree}")
    lock.acquire()
    try:
        from lowvram.world.apply import apply_plan

        applied = ctx.plan
        if no_hook and ctx.plan.ui == "a1111":
            # --no-hook is this run's (LOWVRAM_HOOK=off, which the block never sets, docs/architecture.md#from-facts-to-a-launch): the
            # block and the hook config stay as they are without it, for the user's own webui.sh.
            applied = plan_inputs.make_plan(webui=webui, facts_file=facts,
                                        overrides=replace(overrides, no_hook=False)).plan
        result = apply_plan(applied, tree, ctx.facts, lock_held=True)
        if not ctx.from_facts_file:
            state.remember(tree, overrides.profile)
        for warning in (*ctx.plan.warnings, *spec.warnings):
            render.warn(warning)
        for ext in result.extensions:
            if ext.get("status") == "failed":
                render.warn(f"extension {ext.get('name')} was not installed: {ext.get('reason', '')}")
        render.note(f"lowvram: starting {spec.command_line()}  (in {spec.cwd})")
        for note in spec.notes:
            render.note(f"lowvram: {note}")
        # With --json stdout carries one JSON document: the UI's own output goes to stderr.
        code = launch_mod.run_launch(spec, lock, stdout=_stderr_fd() if as_json else None)
    finally:
        lock.release()
    if as_json:
        render.emit_json({"schema": 1, "plan": ctx.plan.to_dict(), "launch": spec.to_dict(),
                          "apply": result.to_dict(), "exit_code": code})
    if code or not as_json:
        render.note(exit_line(code, spec.exit_code_of))  # the last stderr line: whose exit code this is
    raise typer.Exit(code)


def exit_line(code: int, whose: str = "the UI") -> str:
    """lowvram passes the UI's exit code on, so a 2 from the UI must not read as lowvram's usage error.
    Where only the launcher's status is known (cmd on Windows, Forge Neo's webui.sh), it says so."""
    if whose != "the UI":
        return (f"lowvram: {whose} exited with code {code} (its own last command's status, not necessarily the "
                "UI's: see the UI's output above)")
    if code == 2:
        return ("lowvram: the UI exited with code 2 (its own command-line error, see its output above); "
                "lowvram's own usage errors say \"error:\" or \"Error:\" and exit before starting it")
    if code:
        return f"lowvram: the UI exited with code {code} (the UI's own exit code, see its output above)"
    return "lowvram: the UI exited with code 0"


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _print_dry_run(plan: Any, spec: Any) -> None:
    def say(text: str, hang: int = 10) -> None:
        print(render.wrap(text, hang=hang))

    say(f"profile   {plan.profile}")
    say(f"ui        {plan.ui}  ({plan.webui})")
    say(f"flags     {' '.join(plan.args) or '(none)'}")
    if plan.env:
        print("block     (webui-user managed block)" if plan.ui != "comfyui" else "env")
        for key, value in plan.env.items():
            say(f"  {key}={value}", hang=4)
    reserve = plan.reserve
    say(f"reserve   {reserve.mb} MiB ({'applied' if reserve.applied else 'not applied'}; {reserve.reason})")
    for warning in plan.warnings:
        render.warn(warning)
    print()
    print(f"command   {spec.command_line()}")  # kept on one line: it is copied into a shell
    say(f"cwd       {spec.cwd}")
    if spec.env_changes or spec.env_unset:
        print("env")
        for key, value in spec.env_changes.items():
            say(f"  {key}={value}", hang=4)
        for key in spec.env_unset:
            say(f"  unset {key}", hang=4)
    for note in spec.notes:
        print(render.style(render.wrap(f"note: {note}", hang=6), "dim"))
    for warning in spec.warnings:
        render.warn(warning)
    print(render.style("dry run: nothing was changed", "dim"))
