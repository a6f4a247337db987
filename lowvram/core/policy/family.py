"""What is planned: the profile, the model family (the checkpoint's, --model's or the profile's) and
the family's default target size."""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.core.errors import ProfileError
from lowvram.core.facts import Facts
from lowvram.core.plan import Overrides
from lowvram.core.policy.builder import Builder, Inputs, Target
from lowvram.core.profiles import ResolvedProfile, Selection

DEFAULT_TARGET = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024}


@dataclass(frozen=True)
class FamilyChoice:
    family: str | None
    source: str
    reason: str


def resolve_family(facts: Facts, overrides: Overrides, profile: ResolvedProfile | None) -> FamilyChoice:
    """The model family: the WebUI's checkpoint > --model > an explicit profile's match.model."""
    webui_family = facts.webui.model_family if facts.webui else None
    if webui_family and webui_family != "unknown":
        reason = f"the selected checkpoint {facts.webui.checkpoint!r} is {webui_family}" if facts.webui else ""
        if overrides.model and overrides.model != _base_family(webui_family):
            reason += f" (--model {overrides.model} ignored: the checkpoint says otherwise)"
        return FamilyChoice(webui_family, "auto", reason)
    if overrides.model:
        return FamilyChoice(overrides.model, "cli", f"--model {overrides.model}")
    if profile is not None and overrides.explicit_profile and len(profile.profile.match.model) >= 1:
        fam = profile.profile.match.model[0]
        return FamilyChoice(fam, "profile", f"profile {profile.name} is for {fam}")
    w = facts.webui
    if (w is not None and w.flavor == "a1111" and w.checkpoint is None
            and "--no-download-sd-model" not in (w.user_args or ())):
        # A1111 with no checkpoint at all downloads v1-5-pruned-emaonly at its first start and loads it.
        return FamilyChoice("sd15", "auto", "no checkpoint yet: A1111's first start downloads and loads "
                            "SD 1.5 (v1-5-pruned-emaonly); the next plan follows the checkpoint it finds")
    return FamilyChoice(None, "auto", "unknown: no checkpoint selected and no --model")


def require_family(choice: FamilyChoice, facts: Facts) -> str:
    if choice.family:
        return choice.family
    if facts.webui and facts.webui.checkpoint_error:
        raise ProfileError(f"{facts.webui.checkpoint_error}; its model family is unknown",
                           "give --model sd15, sd2 or sdxl (and re-download the checkpoint or select another)")
    if facts.webui and facts.webui.model_family == "unknown":
        raise ProfileError(
            f"cannot tell the model family of {facts.webui.checkpoint or 'the selected checkpoint'}",
            "give --model sd15, sd2 or sdxl",
        )
    raise ProfileError("the model family is unknown (no checkpoint selected)", "give --model sd15, sd2 or sdxl")


def _base_family(family: str | None) -> str | None:
    return "sdxl" if family == "sdxl-refiner" else family


def _warn_damaged_inputs(b: Builder, facts: Facts, fam: str, fam_choice: FamilyChoice) -> None:
    """Damaged optional inputs the WebUI probe read past (detect/webui.py): the plan says so."""
    w = facts.webui
    if w is not None and w.config_error:
        b.warn(f"{w.config_error} (fix it, or move it away)")
    if w is not None and w.checkpoint_error:
        b.warn(f"{w.checkpoint_error}: planned as {fam} ({fam_choice.reason}); re-download it or select another")


def decide_profile(b: Builder, inp: Inputs, selection: Selection | None) -> None:
    prof, overrides = inp.prof, inp.overrides
    if selection is not None and not overrides.explicit_profile:
        b.add("profile", prof.name, "auto", selection.reason)
    else:
        src = "remembered" if overrides.profile_source == "remembered" else "cli"
        why = "remembered for this WebUI from an earlier apply/launch" if src == "remembered" else f"--profile {prof.name}"
        b.add("profile", prof.name, src, why)


def decide_family(b: Builder, inp: Inputs, family: FamilyChoice | None) -> str:
    fam_choice = family or resolve_family(inp.facts, inp.overrides, inp.resolved)
    fam = require_family(fam_choice, inp.facts)
    b.add("model", fam, fam_choice.source, fam_choice.reason)
    _warn_damaged_inputs(b, inp.facts, fam, fam_choice)
    return fam


def decide_target(inp: Inputs, fam: str) -> Target:
    prof, facts = inp.prof, inp.facts
    side = DEFAULT_TARGET.get(fam, 512)
    bcu = facts.webui.batch_cond_uncond if facts.webui and facts.webui.batch_cond_uncond is not None else True
    return Target(prof.target.width or side, prof.target.height or side, prof.target.batch,
                  prof.target.hires_scale, bcu)
