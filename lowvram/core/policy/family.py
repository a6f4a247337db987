"""What is planned: the profile, the model family (the checkpoint's, --model's, the profile's, or the
SD 1.5 a fresh A1111 loads; one rule for every command) and the family's default target size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from packaging.version import Version

from lowvram.core.errors import FlagError, ProfileError
from lowvram.core.facts import Facts, WebuiFacts
from lowvram.core.plan import Overrides
from lowvram.core.policy.builder import Builder, Inputs, Target, UiStep
from lowvram.core.profiles import ResolvedProfile, Selection
from lowvram.ui import adapter, parse_ui_version

DEFAULT_TARGET = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024, "flux1-dev": 1024,
                  "flux1-schnell": 1024, "sd3-medium": 1024, "sd3.5-medium": 1024, "sd3.5-large": 1024}
# What a fresh A1111 downloads and loads at its first start (v1-5-pruned-emaonly), unless
# --no-download-sd-model: the family lowvram plans for when nothing else says.
FRESH_A1111_FAMILY = "sd15"
# The families policy and the estimator know; detection tells more (core/model_files.py).
PLANNED_FAMILIES = tuple(DEFAULT_TARGET)
SETTLE_FAMILY = "give --model sd15, sd2 or sdxl, or a profile made for one family (e.g. --profile generic-sdxl)"


@dataclass(frozen=True)
class FamilyChoice:
    family: str | None
    source: str
    reason: str


MAX_LISTED = 6  # model files named in a reason; the rest are counted


def _described(webui: WebuiFacts) -> str:
    """'b.gguf (flux1-dev, q4_k_s)'."""
    extra = ", ".join(x for x in (webui.model_family, webui.model_variant, webui.model_format) if x)
    return f"{webui.checkpoint} ({extra})"


def comfy_models_line(webui: WebuiFacts) -> str:
    """What a ComfyUI tree holds and which file was planned for (ComfyUI picks a model per workflow,
    lowvram plans for the newest file); doctor says the same words."""
    files = webui.model_files
    if len(files) <= 1:
        return f"ComfyUI picks a model per workflow: found one, {_described(webui)}; --model FILE plans for another"
    named = ", ".join(files[:MAX_LISTED]) + (f", and {len(files) - MAX_LISTED} more" if len(files) > MAX_LISTED else "")
    return (f"ComfyUI picks a model per workflow: found {len(files)} ({named}); planned for the newest, "
            f"{_described(webui)}; --model FILE plans for another")


def _checkpoint_choice(webui: WebuiFacts | None, model: str | None, *, note_ignored: bool) -> FamilyChoice | None:
    family = webui.model_family if webui is not None else None
    if webui is None or not family or family == "unknown":
        return None
    if family not in PLANNED_FAMILIES and model:  # detected, but not modelled yet: --model answers
        return None
    if webui.flavor == "comfyui":  # nothing is selected there: --model FAMILY counts
        return None if model else FamilyChoice(family, "auto", comfy_models_line(webui))
    reason = f"the selected checkpoint {webui.checkpoint!r} is {family}"
    if note_ignored and model and model != _base_family(family):
        reason += f" (--model {model} ignored: the checkpoint says otherwise)"
    return FamilyChoice(family, "auto", reason)


def ignored_model_warning(webui: WebuiFacts | None, model: str | None) -> str | None:
    """One warning where --model FAMILY names another family than the checkpoint the UI loads at start-up.

    The checkpoint wins (`choose_family`): the UI loads it whatever --model says, so flags and a reserve
    planned for another family would not fit what runs, and the runs observed on this tree (keyed by the
    checkpoint) are that checkpoint's. The user is told, with the two ways to plan for the other model."""
    choice = _checkpoint_choice(webui, model, note_ignored=False)
    if webui is None or choice is None or not model or model == _base_family(choice.family):
        return None
    return (f"--model {model} ignored: {_title(webui.flavor)} loads its checkpoint {webui.checkpoint!r} "
            f"({choice.family}) at start-up, so this plan is for {choice.family}; to plan for {model}, select a "
            f"checkpoint of {model} in the UI (its checkpoint list, saved in config.json) and plan again, "
            "or give that file: --model FILE")


def planned_model(facts: Facts, overrides: Overrides) -> WebuiFacts | None:
    """The model file the plan is for, as checkpoint facts (model_family, model_variant, model_format): the
    WebUI's checkpoint (--model FILE takes its place there, world/plan_inputs.py), else where no WebUI was
    found the file --model FILE read (`Overrides.model_file`; path and flavor empty: there is no tree)."""
    f = overrides.model_file
    if facts.webui is not None or f is None:
        return facts.webui
    return WebuiFacts(path="", flavor="", checkpoint=f.name, model_family=f.family, model_variant=f.variant,
                      model_format=f.format)


def _profile_choice(name: str | None, models: Sequence[str], webui: WebuiFacts | None) -> FamilyChoice | None:
    """A profile made for a family implies it: the checkpoint's where the profile lists it, else its first."""
    if name is None or not models:
        return None
    found = webui.model_family if webui is not None else None
    fam = found if found in models else models[0]
    return FamilyChoice(fam, "profile", f"profile {name} is for {fam}")


def fresh_family(webui: WebuiFacts | None, ui: str | None) -> FamilyChoice | None:
    """SD 1.5 where that is what the UI will load: an A1111 tree with no checkpoint yet, or no WebUI at
    all with A1111 the target (`lowvram setup` installs A1111 by default). Every command asks this one
    rule; None where no model is implied (ComfyUI, Forge and SD.Next download none, or
    --no-download-sd-model)."""
    if webui is None:
        if ui not in (None, "a1111"):
            return None
        return FamilyChoice(FRESH_A1111_FAMILY, "auto",
                            "no WebUI found and no --model: a fresh A1111 downloads and loads SD 1.5 "
                            "(v1-5-pruned-emaonly) at its first start")
    if (webui.flavor == "a1111" and webui.checkpoint is None
            and "--no-download-sd-model" not in (webui.user_args or ())):
        return FamilyChoice(FRESH_A1111_FAMILY, "auto",
                            "no checkpoint yet: A1111's first start downloads and loads SD 1.5 "
                            "(v1-5-pruned-emaonly); the next plan follows the checkpoint it finds")
    return None


def choose_family(webui: WebuiFacts | None, *, model: str | None, profile: str | None = None,
                  profile_models: Sequence[str] = (), ui: str | None = None,
                  cli_first: bool = False) -> FamilyChoice:
    """The model family, for every command: the selected checkpoint > --model > the profile's
    (`cli_first`, for `estimate`'s what-if: --model > the profile's > the checkpoint), then what a
    fresh A1111 loads (`fresh_family`); family None where nothing says (`require_family` explains)."""
    ckpt = _checkpoint_choice(webui, model, note_ignored=not cli_first)
    given = FamilyChoice(model, "cli", f"--model {model}") if model else None
    prof = _profile_choice(profile, profile_models, webui)
    for choice in (given, prof, ckpt) if cli_first else (ckpt, given, prof):
        if choice is not None:
            return choice
    return fresh_family(webui, ui) or FamilyChoice(None, "auto", "unknown: no checkpoint selected and no --model")


def resolve_family(facts: Facts, overrides: Overrides, profile: ResolvedProfile | None) -> FamilyChoice:
    """The plan's model family: the WebUI's checkpoint > --model > an explicit profile's match.model >
    what a fresh A1111 loads (`choose_family`)."""
    explicit = profile is not None and overrides.explicit_profile
    return choose_family(facts.webui, model=overrides.model, profile=profile.name if explicit and profile else None,
                         profile_models=profile.profile.match.model if explicit and profile else (),
                         ui=overrides.ui)


def require_family(choice: FamilyChoice, facts: Facts, ui: str | None = None) -> str:
    """The plan's family, or one ProfileError saying why it is unknown (`family_or_error`)."""
    return family_or_error(choice, facts.webui, ui)


def family_or_error(choice: FamilyChoice, w: WebuiFacts | None, ui: str | None) -> str:
    """The family, or one ProfileError (exit 1, for every command) saying why it is unknown and which
    of the user's choices settles it."""
    if choice.family and choice.family not in PLANNED_FAMILIES and choice.source == "cli":
        raise ProfileError(f"{choice.reason}: lowvram has no memory model for it yet",
                           "--model sdxl plans as SDXL (or --model sd15|sd2)")
    if choice.family and choice.family not in PLANNED_FAMILIES and w is not None and choice.family == w.model_family:
        extra = ", ".join(x for x in (w.model_variant, w.model_format) if x)
        raise ProfileError(f"{choice.family}{f' ({extra})' if extra else ''} detected in {w.checkpoint}: lowvram has "
                           "no memory model for it yet", "--model sdxl plans as SDXL (or --model sd15|sd2)")
    if choice.family:
        return choice.family
    if w is not None and w.checkpoint_error:
        raise ProfileError(f"{w.checkpoint_error}; its model family is unknown",
                           f"{SETTLE_FAMILY} (and re-download the checkpoint or select another)")
    if w is not None and w.model_family == "unknown":
        raise ProfileError(f"cannot tell the model family of {w.checkpoint or 'the selected checkpoint'}",
                           SETTLE_FAMILY)
    if w is not None and w.flavor == "comfyui":
        raise ProfileError(f"the model family is unknown: the ComfyUI at {w.path} has no model file in "
                           "models/checkpoints, models/unet or models/diffusion_models",
                           f"{SETTLE_FAMILY}; or --model FILE")
    if w is not None:
        why = " (--no-download-sd-model: its first start downloads none)" if w.flavor == "a1111" else ""
        raise ProfileError(f"the model family is unknown: the {_title(w.flavor)} at {w.path} has no checkpoint "
                           f"selected{why}", f"{SETTLE_FAMILY}; or select a checkpoint in the UI")
    raise ProfileError(f"the model family is unknown: no WebUI found, and a fresh {_title(ui)} downloads no model",
                       f"{SETTLE_FAMILY}; or --webui PATH to a WebUI with a checkpoint selected")


def _title(ui: str | None) -> str:
    try:
        return adapter(ui or "a1111").title
    except FlagError:
        return str(ui)


def _base_family(family: str | None) -> str | None:
    return "sdxl" if family == "sdxl-refiner" else family


# Which UI runs which diffusion transformer. A1111 1.10.0 added SD3 medium (modules/models/sd3, the
# setting sd3_enable_t5) and nothing later: no Flux.1, no SD3.5 (its MMDiT-X). Forge (HEAD), ComfyUI and
# SD.Next run all five.
A1111_SD3_FROM = "1.10.0"
FLUX_FAMILIES = ("flux1-dev", "flux1-schnell")
SD35_FAMILIES = ("sd3.5-medium", "sd3.5-large")
ELSEWHERE = "lowvram setup --ui forge (or --ui comfyui), then plan there with --webui PATH"


def require_ui_runs(ui_key: str, fam: str, version: str | None, *, tree: bool) -> str | None:
    """One ProfileError where the UI cannot run the family at all; a warning where it may not (an A1111 of
    unknown version and SD3); None where it runs. `tree`: planning for a WebUI found on disk (with no tree,
    A1111 is the 1.10.1 `lowvram setup` installs)."""
    if ui_key != "a1111":
        return None
    if fam in FLUX_FAMILIES:
        raise ProfileError(f"{fam}: Flux.1 runs in Forge, ComfyUI or SD.Next, not A1111", ELSEWHERE)
    if fam in SD35_FAMILIES:
        raise ProfileError(f"{fam}: SD 3.5 runs in Forge, ComfyUI or SD.Next, not A1111 "
                           "(A1111 1.10 runs SD3 medium only)", ELSEWHERE)
    if fam != "sd3-medium" or not tree:
        return None
    v = parse_ui_version(version)
    if v is None:
        return (f"SD3 medium runs in A1111 from {A1111_SD3_FROM}; this A1111's version is unknown: if it is older, "
                "update it (git checkout v1.10.1 in its folder) or use Forge")
    if v < Version(A1111_SD3_FROM):
        raise ProfileError(f"sd3-medium: SD3 runs in A1111 from {A1111_SD3_FROM}, this A1111 is {v}",
                           f"update it (git checkout v1.10.1 in its folder), or {ELSEWHERE}")
    return None


def decide_ui_runs(b: Builder, inp: Inputs, u: UiStep, fam: str) -> None:
    """Stop where the UI cannot run the family (one line and where it runs); warn where it may not."""
    webui = inp.facts.webui
    warning = require_ui_runs(u.key, fam, u.version, tree=webui is not None and webui.flavor == u.key)
    if warning:
        b.warn(warning)


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
    fam = require_family(fam_choice, inp.facts, inp.overrides.ui)
    b.add("model", fam, fam_choice.source, fam_choice.reason)
    ignored = ignored_model_warning(inp.facts.webui, inp.overrides.model) if fam_choice.source == "auto" else None
    if ignored:
        b.warn(ignored)
    _warn_damaged_inputs(b, inp.facts, fam, fam_choice)
    return fam


def decide_target(inp: Inputs, fam: str) -> Target:
    prof, facts = inp.prof, inp.facts
    side = DEFAULT_TARGET.get(fam, 512)
    bcu = facts.webui.batch_cond_uncond if facts.webui and facts.webui.batch_cond_uncond is not None else True
    return Target(prof.target.width or side, prof.target.height or side, prof.target.batch,
                  prof.target.hires_scale, bcu)
