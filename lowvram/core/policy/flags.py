"""The UI and its flags: the target UI with the user's own flags, the plan's flags, and the merge of
both (docs/architecture.md#the-policy, "Merging the user's flags")."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from lowvram.core.facts import Facts, UiFlagsFacts
from lowvram.core.plan import Decision
from lowvram.core.policy.builder import Builder, Inputs, Merge, UiStep
from lowvram.ui import Contradiction, UiSettings, adapter, parse_args
from lowvram.ui.base import UiAdapter, flags_for


def decide_ui(b: Builder, inp: Inputs) -> UiStep:
    facts, overrides = inp.facts, inp.overrides
    flavor = facts.webui.flavor if facts.webui else None
    if overrides.ui:
        ui_key = overrides.ui
        b.add("ui", ui_key, "cli", f"--ui {ui_key}")
        if flavor and flavor != ui_key:
            b.warn(f"--ui {ui_key} given, but the WebUI at {inp.webui_path} is {flavor}: its flags are planned for {ui_key}")
    elif flavor:
        ui_key = flavor
        b.add("ui", ui_key, "auto", f"the WebUI tree is {flavor}")
    else:
        ui_key = "a1111"
        b.add("ui", ui_key, "auto", "no WebUI found and no --ui: planning for A1111")
    ui = adapter(ui_key)
    version = facts.webui.version if facts.webui and facts.webui.flavor == ui_key else None
    return _user_flags(facts, ui_key, ui, version)


def _user_flags(facts: Facts, ui_key: str, ui: UiAdapter, version: str | None) -> UiStep:
    """The user's own flags (literal COMMANDLINE_ARGS), read where the tree is this UI."""
    flagset, _ = flags_for(ui, version, _installed(facts, ui_key))
    user_tokens: tuple[str, ...] = ()
    user_literal = True
    if facts.webui is not None and facts.webui.flavor == ui_key:
        user_literal = facts.webui.user_args_literal
        user_tokens = tuple(facts.webui.user_args or ())
    user_parsed = parse_args(user_tokens, flagset, strict=False) if user_literal else []
    user_device = next((p.value for p in user_parsed if p.name == ui.device_flag and p.value), None)
    return UiStep(ui_key, ui, version, flagset, user_tokens, user_literal, user_parsed, user_device)


def decide_flags(b: Builder, inp: Inputs, u: UiStep, settings: UiSettings) -> list[str]:
    """The UI's flags for the settings decided so far, and the profile's extra flags."""
    prof = inp.prof
    rendered = u.ui.render(settings, u.version)
    for note in rendered.notes:
        b.add("flags", None, "auto", note)
    plan_args = list(rendered.args) + [a for a in prof.args if a not in rendered.args]
    if prof.args:
        b.add("args", list(prof.args), "profile", f"extra flags from profile {prof.name}")
    installed = _installed(inp.facts, u.key)
    _, unread = flags_for(u.ui, u.version, installed)
    if unread:
        b.add("flags", None, "auto", unread)
    elif installed is not None:
        plan_args = _drop_missing(b, u, plan_args, installed.source)
    u.ui.validate(plan_args, u.version, u.flagset)
    return plan_args


def checked_against(inp: Inputs, u: UiStep) -> str:
    """What the flags were checked against: the installed version's own parser, or lowvram's list."""
    installed = _installed(inp.facts, u.key)
    if installed is not None and installed.flags and not installed.error:
        return f"{u.flagset.label} ({installed.source})"
    return u.ui.describe(u.version)


def _installed(facts: Facts, ui_key: str) -> UiFlagsFacts | None:
    """The installed UI's own flags, where the tree is this UI and they were read."""
    return facts.webui.ui_flags if facts.webui is not None and facts.webui.flavor == ui_key else None


def _drop_missing(b: Builder, u: UiStep, plan_args: list[str], source: str) -> list[str]:
    """Leave out a plan flag the installed version's own parser lacks (the UI would exit 2 on it)."""
    shipped = u.ui.flagset(u.version)
    kept: list[str] = []
    for p in parse_args(plan_args, shipped, strict=True):
        if p.name in u.flagset:
            kept += p.tokens
        else:
            b.add("flags", None, "auto", f"{' '.join(p.tokens)} left out: {u.flagset.label} has no {p.name} "
                                         f"(its own {source} does not define it)")
    return kept


def merge_user_flags(b: Builder, inp: Inputs, u: UiStep, plan_args: list[str], *, device_index: int | None,
                     offload: str, attention: str) -> Merge:
    """docs/architecture.md#the-policy, "Merging the user's flags"."""
    merge = "append"
    user_dropped: list[str] = []
    user_kept: list[str] = list(u.user_tokens)
    plan_dropped: list[str] = []
    if not u.user_literal:
        b.warn("your COMMANDLINE_ARGS is not a literal value ($VAR or $(...)): lowvram appends its flags "
               "and cannot check them against yours")
    elif u.user_parsed:
        plan_parsed = parse_args(plan_args, u.flagset, strict=True)
        conflicts = u.ui.cross_contradictions(u.user_parsed, plan_parsed, u.flagset)
        drop_user, drop_plan, offload, attention = _settle_conflicts(b, inp, u, conflicts, device_index=device_index,
                                                                     offload=offload, attention=attention)
        if drop_user:
            merge = "assign"
            user_dropped = [t for p in u.user_parsed if p.tokens in drop_user for t in p.tokens]
            user_kept = [t for p in u.user_parsed if p.tokens not in drop_user for t in p.tokens]
        if drop_plan:
            plan_dropped = [t for p in plan_parsed if p.tokens in drop_plan for t in p.tokens]
            plan_args = [t for p in plan_parsed if p.tokens not in drop_plan for t in p.tokens]
        b.add("merge", merge, "user" if conflicts else "auto",
              "append the plan's flags to your COMMANDLINE_ARGS at run time; their later values override your "
              + " ".join(user_dropped) if merge == "assign"
              else "append the plan's flags to your COMMANDLINE_ARGS at run time")
    if inp.overrides.extra_args:
        plan_args, offload, attention = _settle_extra(b, inp, u, plan_args, plan_dropped, offload=offload,
                                                      attention=attention)
    return Merge(merge, user_dropped, user_kept, plan_dropped, plan_args, offload, attention)


def _settle_extra(b: Builder, inp: Inputs, u: UiStep, plan_args: list[str], plan_dropped: list[str], *,
                  offload: str, attention: str) -> tuple[list[str], str, str]:
    """The user's flags after `launch --` against the plan's: the user's wins (it is this run's word),
    the plan's is left out of the command line, and the user is told (the same as an on/off flag in
    COMMANDLINE_ARGS). Two flags of one exclusive group would make the UI exit 2; a valued flag in the
    block would be read after the command line's. The device flag stays as the GPU choice decided it."""
    extra = parse_args(inp.overrides.extra_args, u.flagset, strict=False)
    plan_parsed = parse_args(plan_args, u.flagset, strict=True)
    drop: set[tuple[str, ...]] = set()
    for c in u.ui.cross_contradictions(extra, plan_parsed, u.flagset):
        if c.first[0].split("=")[0] == u.ui.device_flag or c.second in drop:
            continue
        drop.add(c.second)
        b.warn(f"your {' '.join(c.first)} (after --) contradicts the plan's {' '.join(c.second)}: kept yours and "
               "left the plan's out of the command line")
        user_value = u.ui.categories.get(c.category, {}).get(c.first[0].split("=")[0])
        if c.category == "offload" and user_value:
            offload = _user_decision(b, "offload", user_value, c, offload)
        elif c.category == "attention" and user_value:
            attention = _user_decision(b, "attention", user_value, c, attention)
    plan_dropped += [t for p in plan_parsed if p.tokens in drop for t in p.tokens]
    return [t for p in plan_parsed if p.tokens not in drop for t in p.tokens], offload, attention


def _settle_conflicts(b: Builder, inp: Inputs, u: UiStep, conflicts: Iterable[Contradiction], *,
                      device_index: int | None, offload: str,
                      attention: str) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]], str, str]:
    """Who wins each contradiction between the user's flags and the plan's: (user's dropped, plan's dropped,
    offload, attention)."""
    prof, overrides, ui = inp.prof, inp.overrides, u.ui
    drop_user: set[tuple[str, ...]] = set()
    drop_plan: set[tuple[str, ...]] = set()
    for c in conflicts:
        if c.first and c.first[0].split("=")[0] == ui.device_flag and device_index is not None:
            drop_user.add(c.first)
            b.warn(f"your {' '.join(c.first)} is replaced by {' '.join(c.second)}: the chosen GPU is pinned "
                   "with CUDA_VISIBLE_DEVICES, so it is device 0")
        elif overrides.explicit_profile and c.category.endswith(" value"):
            # The block appends after the user's live line and argparse keeps a flag's last value.
            drop_user.add(c.first)
            b.warn(f"your {' '.join(c.first)} contradicts the plan's {' '.join(c.second)}: profile "
                   f"{prof.name} was given explicitly, so the plan's value (after yours) wins")
        else:
            # An on/off flag cannot be switched off from the block, and the user's line is never
            # edited or frozen (issue 14): the user's flag wins, at run time.
            drop_plan.add(c.second)
            b.warn(f"your {' '.join(c.first)} contradicts the plan's {' '.join(c.second)}: kept yours and "
                   + (f"left the plan's out (an on/off flag in your COMMANDLINE_ARGS cannot be overridden; "
                      f"take {' '.join(c.first)} out of it for profile {prof.name}'s)"
                      if overrides.explicit_profile else "left the plan's out (give --profile to override yours)"))
            # The UI runs with the user's rung/backend: say so, and let the hook record that one
            # (a run on --lowvram must not teach the ladder about the plan's --medvram-sdxl).
            user_value = ui.categories.get(c.category, {}).get(c.first[0].split("=")[0])
            if c.category == "offload" and user_value:
                offload = _user_decision(b, "offload", user_value, c, offload)
            elif c.category == "attention" and user_value:
                attention = _user_decision(b, "attention", user_value, c, attention)
    return drop_user, drop_plan, offload, attention


def _user_decision(b: Builder, setting: str, value: str, c: Contradiction, planned: str) -> str:
    """Replace the plan's decision for `setting` with the user's value that wins over it."""
    for i, d in enumerate(b.decisions):
        if d.setting == setting:
            b.decisions[i] = Decision(setting, value, "user",
                                      f"your {' '.join(c.first)} stays (the plan had {planned}: {d.reason})")
            break
    return value


def join_args(args: Sequence[str]) -> str:
    """One string A1111's shlex.split reads back as `args` (single quotes where needed)."""
    return " ".join(shlex.quote(a) for a in args)
