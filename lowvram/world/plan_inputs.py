"""Edge glue for plan/apply/launch/tune/setup: find the WebUI, the facts, the profile, the family,
the observations and the extension registry, then call the pure policy. It never writes state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from lowvram.core import policy
from lowvram.core.errors import UsageError
from lowvram.core.facts import Facts, WebuiFacts
from lowvram.core.observations import Observation
from lowvram.core.plan import ExtensionSpec, Overrides, Plan
from lowvram.core.profiles import ResolvedProfile, Selection
from lowvram.world import paths, state
from lowvram.world.profile_files import load_all_checked, load_profile, select_profile


@dataclass(frozen=True)
class PlanContext:
    plan: Plan
    facts: Facts
    webui: Path | None
    from_facts_file: bool
    profile: ResolvedProfile | None = None
    selection: Selection | None = None
    observations: tuple[Observation, ...] = ()


def _facts_file(facts_file: Path | None) -> Path | None:
    if facts_file is not None:
        return Path(facts_file)
    env = os.environ.get("LOWVRAM_FACTS")
    return Path(env) if env else None


def _locate_webui(webui: Path | None) -> tuple[Path, str] | None:
    from lowvram.world.detect import locate_webui

    return locate_webui(webui)


def check_ui_matches(ui: str | None, webui: WebuiFacts | None, origin: str | None) -> None:
    """`--ui` names the UI to plan for where no WebUI is found; one that contradicts the WebUI found
    is a usage error, never a plan for another UI on that tree (docs/architecture.md#the-cli-contract).
    `origin` says how the tree was found (`world/detect`'s `locate_webui`), None for a facts file's."""
    if not ui or webui is None or not webui.flavor or webui.flavor == ui:
        return
    from lowvram.ui import adapter

    theirs, wanted = adapter(webui.flavor).title, adapter(ui).title
    where = (f"the facts file's WebUI at {webui.path} is {theirs}" if origin is None
             else f"the WebUI found at {webui.path} ({origin}) is {theirs}")
    raise UsageError(f"--ui {ui}, but {where}",
                     f"for {wanted}, pass --webui PATH to its folder; for this {theirs}, drop --ui")


def _gather(webui: Path | None, facts_file: Path | None) -> Facts:
    from lowvram.world.detect import gather_facts

    return gather_facts(webui=webui, facts_file=facts_file)


def load_registry() -> dict[str, ExtensionSpec]:
    """The extension registry (lowvram/data/extensions.json), validated by the apply edge."""
    from lowvram.world.apply.extensions import registry_specs

    return registry_specs()


def load_xformers_builds() -> dict[str, str]:
    """lowvram/data/xformers_torch.json: xformers version → the torch it was built for (with sources)."""
    from lowvram.world.diagnosis import load_table

    try:
        builds = load_table("xformers_torch.json").get("builds")
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in builds.items()} if isinstance(builds, dict) else {}


def make_plan(*, webui: Path | None, facts_file: Path | None, overrides: Overrides) -> PlanContext:
    """Everything `lowvram plan` does short of printing; apply/launch/tune/setup reuse it."""
    facts_path = _facts_file(facts_file)
    located = _locate_webui(webui)
    webui_path = located[0] if located else None
    facts = _gather(webui_path, facts_path)
    check_ui_matches(overrides.ui, facts.webui, located[1] if located else None)

    if os.environ.get("LOWVRAM_HOOK", "").strip().lower() == "off" and not overrides.no_hook:
        overrides = replace(overrides, no_hook=True)  # docs/architecture.md#the-policy: --no-hook or LOWVRAM_HOOK=off

    if overrides.profile is None and webui_path is not None:
        remembered = state.remembered_profile(webui_path)
        if remembered:
            overrides = replace(overrides, profile=remembered, profile_source="remembered")

    resolved = load_profile(overrides.profile) if overrides.explicit_profile and overrides.profile else None
    family = policy.resolve_family(facts, overrides, resolved)
    selection = None
    skipped: tuple[str, ...] = ()  # profiles that do not load: left out of the selection, warned once
    if resolved is None:
        fam = policy.require_family(family, facts, overrides.ui)
        candidates, problems = load_all_checked()
        skipped = tuple(problems)
        selection = select_profile(facts, fam, candidates, gpu=policy.gpu_for(facts, overrides), use_largest_gpu=False)
        resolved = load_profile(selection.name)

    observations: tuple[Observation, ...] = ()
    obs_warnings: tuple[str, ...] = ()
    if webui_path is not None:
        from lowvram.world.observation_log import load_observations

        loaded = load_observations(paths.observations_path(webui_path))
        observations = tuple(loaded.items)
        obs_warnings = tuple(loaded.warnings)

    the_plan = policy.plan(
        facts,
        resolved,
        observations,
        overrides,
        hook_config_path=str(paths.hook_config_path(webui_path)) if webui_path is not None else None,
        webui_path=str(webui_path) if webui_path is not None else None,
        registry=load_registry(),
        family=family,
        selection=selection,
        xformers_builds=load_xformers_builds(),
    )
    if obs_warnings or skipped:
        the_plan = replace(the_plan, warnings=the_plan.warnings + skipped + obs_warnings)
    return PlanContext(the_plan, facts, webui_path, facts_path is not None, resolved, selection, observations)
