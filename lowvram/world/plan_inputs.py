"""Edge glue for plan/apply/launch/tune/setup: find the WebUI, the facts, the profile, the family,
the observations and the extension registry, then call the pure policy. It never writes state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from lowvram.core import policy
from lowvram.core.errors import UsageError
from lowvram.core.facts import Facts, GpuFacts, WebuiFacts
from lowvram.core.observations import Observation, OtherTreeRuns
from lowvram.core.plan import ExtensionSpec, ModelFile, Overrides, Plan
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


# --model FILE: the files lowvram reads a family from (a .ckpt/.pt pickle is never opened).
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")
_MODEL_HINT = ("give a family ({families}), or a .safetensors or .gguf file: a path, or a file name in the "
               "WebUI's model folders")


@dataclass(frozen=True)
class ModelArg:
    """`--model` resolved: the family name the policy takes, the WebUI's facts with the file as its
    checkpoint (as if the UI had it selected), and for a file the plan's family choice and its reason, and
    where no WebUI was found the file's header (`Overrides.model_file`: its format and variant still count)."""

    family: str | None
    webui: WebuiFacts | None
    choice: policy.FamilyChoice | None = None
    file: ModelFile | None = None


def _model_dirs(webui: WebuiFacts | None) -> list[Path]:
    from lowvram.world.detect.webui import checkpoint_dirs, comfy_model_dirs

    if webui is None or not webui.path:
        return []
    root = Path(webui.path)
    return comfy_model_dirs(root)[0] if webui.flavor == "comfyui" else checkpoint_dirs(root, webui.user_args)


def _usage(value: str, what: str) -> UsageError:
    from lowvram.core.model_files import DETECTED_FAMILIES

    return UsageError(f"--model {value}: {what}", _MODEL_HINT.format(families=", ".join(DETECTED_FAMILIES)))


def find_model_file(value: str, webui: WebuiFacts | None) -> Path:
    """The file `--model VALUE` names: a path (absolute, or relative to the current directory), else a
    name (or a path relative to a model folder) in the WebUI's model folders; one UsageError otherwise."""
    from lowvram.world.detect.webui import _walk_checkpoints
    from lowvram.world.fsutil import special_kind

    try:
        path = Path(value).expanduser()
        there = os.path.lexists(path)
    except (OSError, ValueError, RuntimeError):
        path, there = Path(value), False
    if not there:
        wanted = value.replace("\\", "/")
        suffixes = (*MODEL_FILE_SUFFIXES, ".ckpt", ".pt")
        found = [f for d, f in _walk_checkpoints(_model_dirs(webui), suffixes)
                 if f.relative_to(d).as_posix() == wanted or f.name == wanted]
        if not found:
            where = " or in the WebUI's model folders" if webui is not None else ""
            raise _usage(value, f"not a model family, and no such file here{where}")
        path = found[0]
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _usage(value, f"cannot read {path}: {exc.strerror or exc}") from exc
    kind = "a folder" if os.path.isdir(path) else special_kind(st.st_mode)
    if kind is not None:
        raise _usage(value, f"{path} is {kind}, not a model file")
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt"):
        raise _usage(value, f"{path} is a pickle ({suffix}): lowvram never opens one, so its family is unknown")
    if suffix not in MODEL_FILE_SUFFIXES:
        raise _usage(value, f"{path} is not a model file (.safetensors, .sft or .gguf)")
    return path


def resolve_model_arg(model: str | None, webui: WebuiFacts | None) -> ModelArg:
    """`--model`: a value that is a family is that family (even where a file of that name exists);
    anything else is a model file, read with the bounded header reader, planned for as the UI's
    selected checkpoint. A damaged file or an unknown family is one error line (exit 1)."""
    from lowvram.core import markers
    from lowvram.core.errors import ProfileError
    from lowvram.core.model_files import DETECTED_FAMILIES
    from lowvram.world.detect.checkpoint import checkpoint_info

    if model is None or model in DETECTED_FAMILIES:
        return ModelArg(model, webui)
    path = find_model_file(model, webui)
    info = checkpoint_info(path)  # a damaged header: one WebuiError line naming the file
    if info.family == "unknown":
        raise ProfileError(f"--model {model}: cannot tell the model family of {path.name}: {info.describe()}",
                           f"give its family instead: --model {'|'.join(DETECTED_FAMILIES)}")
    choice = policy.FamilyChoice(info.family, "cli", f"--model FILE: {path.name} is {info.describe()}")
    if webui is not None:
        st = os.stat(path)
        webui = replace(webui, checkpoint=path.name, checkpoint_path=str(path.resolve()),
                        checkpoint_key=markers.checkpoint_key(path.name, st.st_size, st.st_mtime),
                        model_family=info.family, model_variant=info.variant, model_format=info.format,
                        checkpoint_error=None)
        return ModelArg(info.family, webui, choice)
    return ModelArg(info.family, None, choice, ModelFile(path.name, info.family, info.variant, info.format))


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


def other_ui_runs(facts: Facts, webui_path: Path | None,
                  gpu: GpuFacts | None) -> tuple[tuple[OtherTreeRuns, ...], tuple[str, ...]]:
    """What other WebUI trees learnt about this tree's model file (the same content, wherever it lies) on
    `gpu` (docs/architecture.md#observations-back-into-the-plan). Nothing without a model file or a GPU."""
    from lowvram.core.errors import LowvramError
    from lowvram.world.detect.checkpoint import content_key
    from lowvram.world.observation_log import ThisModel, other_tree_runs

    wf = facts.webui
    if wf is None or not wf.checkpoint_path or gpu is None:
        return (), ()
    try:
        key = content_key(Path(wf.checkpoint_path))
        size = os.stat(wf.checkpoint_path).st_size
    except (LowvramError, OSError):
        return (), ()  # the file's own problems are reported where its header is read
    sole = facts.gpus[0].vram_total_mb if len(facts.gpus) == 1 else None
    own = paths.webui_state_dir(webui_path) if webui_path is not None else None
    return other_tree_runs(paths.state_dir() / "webuis", own, ThisModel(key, size, gpu.uuid, sole))


def make_plan(*, webui: Path | None, facts_file: Path | None, overrides: Overrides) -> PlanContext:
    """Everything `lowvram plan` does short of printing; apply/launch/tune/setup reuse it."""
    facts_path = _facts_file(facts_file)
    located = _locate_webui(webui)
    webui_path = located[0] if located else None
    facts = _gather(webui_path, facts_path)
    check_ui_matches(overrides.ui, facts.webui, located[1] if located else None)
    model_arg = resolve_model_arg(overrides.model, facts.webui)
    facts = facts.with_webui(model_arg.webui)
    overrides = replace(overrides, model=model_arg.family, model_file=model_arg.file)

    if os.environ.get("LOWVRAM_HOOK", "").strip().lower() == "off" and not overrides.no_hook:
        overrides = replace(overrides, no_hook=True)  # docs/architecture.md#the-policy: --no-hook or LOWVRAM_HOOK=off

    if overrides.profile is None and webui_path is not None:
        remembered = state.remembered_profile(webui_path)
        if remembered:
            overrides = replace(overrides, profile=remembered, profile_source="remembered")

    resolved = load_profile(overrides.profile) if overrides.explicit_profile and overrides.profile else None
    family = model_arg.choice or policy.resolve_family(facts, overrides, resolved)
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
    other_runs, other_warnings = other_ui_runs(facts, webui_path, policy.gpu_for(facts, overrides))
    obs_warnings += other_warnings

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
        other_runs=other_runs,
    )
    if obs_warnings or skipped:
        the_plan = replace(the_plan, warnings=the_plan.warnings + skipped + obs_warnings)
    return PlanContext(the_plan, facts, webui_path, facts_path is not None, resolved, selection, observations)
