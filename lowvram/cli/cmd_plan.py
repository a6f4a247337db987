"""`lowvram plan`: what lowvram would do on this machine, each decision with its source and reason.

Changes nothing and remembers nothing (docs/architecture.md#the-cli-contract).
"""

from __future__ import annotations

from typing import Any

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


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "-"
    return str(value)


def render_plan_text(plan: Any, facts_note: str | None = None) -> str:
    """The human view of a plan (apply/launch print it too)."""
    from lowvram.cli import render

    lines = []
    head = f"Plan for {plan.ui}" + (f" at {plan.webui}" if plan.webui else " (no WebUI found)")
    lines.append(render.lead(head, f"profile {plan.profile}, model {plan.model_family}", "bold", sep="  "))
    if facts_note:
        lines.append(render.style(render.wrap(facts_note), "dim"))
    lines.append("")
    rows = [(d.setting, _value(d.value), d.source, d.reason) for d in plan.decisions]
    lines.append(render.table(("setting", "value", "source", "why"), rows, no_wrap=(0, 2)))
    lines.append("")
    lines.append(render.lead("flags lowvram adds:", " ".join(plan.args) or "(none)", "bold", hang=4))
    if plan.merge == "assign":
        lines.append(render.wrap(f"  overrides your {' '.join(plan.user_args_dropped)} (its values come after yours)"))
    if plan.plan_args_dropped:
        lines.append(render.wrap(f"  left out (your flags contradict them): {' '.join(plan.plan_args_dropped)}"))
    if plan.env:
        lines.append(render.style("environment:", "bold"))
        for key, value in plan.env.items():
            lines.append(render.wrap(f"  {key}={value}", hang=4))
    for w in plan.warnings:
        lines.append(render.lead("warning:", w, "warn"))
    return "\n".join(lines)


def plan_command(  # noqa: PLR0917 (typer: one parameter per option)
    profile: ProfileOpt = None,
    webui: WebuiOpt = None,
    ui: UiOpt = None,
    model: ModelOpt = None,
    facts: FactsOpt = None,
    offload: OffloadOpt = None,
    layout: LayoutOpt = None,
    sysmem_fallback: SysmemOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show what lowvram would configure, and why. Changes nothing.

    \b
    Example:
      lowvram plan --profile gtx1070-sdxl --json
    """
    from lowvram.cli import render
    from lowvram.world.plan_inputs import make_plan

    overrides = overrides_from(profile=profile, ui=ui, model=model, offload=offload, layout=layout,
                               sysmem_fallback=sysmem_fallback)
    ctx = make_plan(webui=webui, facts_file=facts, overrides=overrides)
    if json_out:
        render.emit_json(ctx.plan.to_dict())
        return
    note = "facts from a file (--facts / LOWVRAM_FACTS), not probed" if ctx.from_facts_file else None
    print(render_plan_text(ctx.plan, note))
