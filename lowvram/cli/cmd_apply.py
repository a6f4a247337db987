"""`lowvram apply` (write the plan into the WebUI) and `lowvram revert` (take it all out again)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lowvram.cli import render
from lowvram.cli.cmd_extensions import clone_progress, render_extensions, resolve_webui
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
from lowvram.core.errors import WebuiError


def _short(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


_WOULD = {"created": "would create", "modified": "would modify", "removed": "would remove"}


def _print_changes(changes: list[dict[str, str]], root: Path, dry_run: bool = False) -> None:
    styles = {"created": "ok", "modified": "ok", "removed": "ok", "unchanged": "dim"}
    width = 12 if dry_run else 9
    for change in changes:
        action = change["action"]
        label = _WOULD.get(action, action) if dry_run else action
        line = render.wrap(f"  {label.ljust(width)} {_short(change['path'], root)}", hang=width + 3)
        print(line.replace(label, render.style(label, styles.get(action, "dim")), 1))


def apply_cmd(  # noqa: PLR0917 - one parameter per CLI option
    profile: ProfileOpt = None,
    webui: WebuiOpt = None,
    ui: UiOpt = None,
    model: ModelOpt = None,
    facts: FactsOpt = None,
    offload: OffloadOpt = None,
    layout: LayoutOpt = None,
    sysmem_fallback: SysmemOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff and the extensions; change nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write the plan into the WebUI (managed block, hook, extensions) without starting it.

    The user's usual webui.sh / webui-user.bat then starts with the plan too. `lowvram revert`
    takes it all out again.

    \b
    Examples:
      # the diff and the extensions; changes nothing
      lowvram apply --dry-run
      # remembered for this WebUI
      lowvram apply --profile gtx1070-sdxl
      lowvram apply --webui ~/stable-diffusion-webui --json
    """
    from lowvram.world import state
    from lowvram.world.apply import apply_plan
    from lowvram.world.plan_inputs import make_plan

    overrides = overrides_from(profile=profile, ui=ui, model=model, offload=offload, layout=layout,
                               sysmem_fallback=sysmem_fallback)
    ctx = make_plan(webui=webui, facts_file=facts, overrides=overrides)
    if ctx.webui is None:
        raise WebuiError("no WebUI found to apply the plan to",
                         "pass --webui PATH (or run from the WebUI's folder); `lowvram plan` works without one")
    tree = Path(ctx.webui)
    with clone_progress(not json_out and not dry_run) as progress:
        result = apply_plan(ctx.plan, tree, ctx.facts, dry_run=dry_run, progress=progress)
    if not dry_run and not ctx.from_facts_file:
        state.remember(tree, overrides.profile if overrides.profile else None)
    failed = ("some extensions could not be installed (the managed block was written)",
              "see the notes under the table; offline, use LOWVRAM_MIRROR=DIR or `lowvram install-extensions "
              "--source NAME=URL`")
    if json_out:
        data = {"schema": 1, "plan": ctx.plan.to_dict(), "webui": str(tree), **result.to_dict()}
        if result.exit_code:
            data["error"] = {"message": failed[0], "hint": failed[1]}
        render.emit_json(data)
        if result.exit_code:
            render.error(*failed)
        raise typer.Exit(result.exit_code)
    plan = ctx.plan
    if dry_run:
        print(render.wrap(f"apply --dry-run: {tree} ({plan.ui}, profile {plan.profile}); nothing was changed"))
        _print_changes(result.changes, tree, dry_run=True)
        if result.diff:
            print(result.diff.rstrip("\n"))
        elif result.target:
            print(f"{_short(result.target, tree)} already holds this plan")
    elif not result.changes and plan.ui == "comfyui":
        print(render.wrap(f"profile {plan.profile} for {tree} ({plan.ui}): nothing to write"))
    else:
        print(render.wrap(f"applied profile {plan.profile} to {tree} ({plan.ui}):"))
        _print_changes(result.changes, tree)
    if not result.changes and plan.ui == "comfyui":
        # ComfyUI reads no webui-user file: say what apply did instead of an empty list.
        where = (f"`lowvram launch` puts the flags on main.py's command line: {' '.join(plan.args)}" if plan.args
                 else "and this plan adds no flags to main.py's command line (`lowvram plan` says why)")
        print(render.wrap(f"  ComfyUI has no webui-user file, so nothing is written into the tree; {where}", hang=2))
    if result.extensions:
        print("extensions:" if not dry_run else "extensions (what apply would do):")
        print(render_extensions(result.extensions, dry_run=dry_run))
    for note in result.notes:
        render.note(note)
    for warning in plan.warnings:
        render.warn(warning)
    if result.exit_code:
        render.error(*failed)
    raise typer.Exit(result.exit_code)


def revert_cmd(webui: WebuiOpt = None, json_out: JsonOpt = False) -> None:
    """Take out everything lowvram put into the WebUI (what its manifest records).

    With no edits since apply the tree is byte-for-byte as before; edits you made stay, and an
    extension holding your files (VRAM Estimator's stats.json) is kept.

    \b
    Examples:
      lowvram revert
      lowvram revert --webui ~/stable-diffusion-webui --json
    """
    from lowvram.world.apply import revert

    tree = resolve_webui(webui, strict=False)
    result = revert(tree)
    if json_out:
        render.emit_json({"schema": 1, "webui": str(tree), **result.to_dict()})
        raise typer.Exit(result.exit_code)
    if not result.changes and not result.extensions:
        print(f"nothing to revert in {tree}")
    else:
        print(f"reverted {tree}:")
        _print_changes(result.changes, tree)
    kept = [e for e in result.extensions if e["status"] == "kept"]
    if kept:
        print(render_extensions(kept))
    for note in result.notes:
        render.note(note)
    raise typer.Exit(result.exit_code)
