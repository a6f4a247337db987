"""The Plan: what lowvram decided for one WebUI, each setting with its value, source and reason.

Built only by `policy.plan()` (pure); consumed by apply/, launch and the renderers. `to_dict()` is
the `plan --json` contract of docs/architecture.md#the-cli-contract: change it only by adding keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SOURCES = ("cli", "profile", "auto", "user", "remembered", "observations", "tuning")
OFFLOADS = ("none", "medvram-sdxl", "medvram", "lowvram", "novram", "cpu")
ROADS = ("swap", "resident")


@dataclass(frozen=True)
class ModelFile:
    """A model file's header as `--model FILE` read it (core/model_files.py): name, family, variant, format."""

    name: str
    family: str
    variant: str | None = None
    format: str | None = None


@dataclass(frozen=True)
class Overrides:
    """What the command line (or remembered state) asked for; None = not asked."""

    profile: str | None = None  # a name, or "auto"
    profile_source: str = "cli"  # cli | remembered
    ui: str | None = None
    model: str | None = None
    offload: str | None = None
    layout: str | None = None  # auto | on | off
    sysmem_fallback: str | None = None  # auto | on | off
    no_hook: bool = False
    extra_args: tuple[str, ...] = ()
    # --model FILE where no WebUI was found (with one, the file becomes its checkpoint in the facts):
    # the file's header, for the steps that read the model file (policy/family.py `planned_model`).
    model_file: ModelFile | None = None

    @property
    def explicit_profile(self) -> bool:
        return self.profile is not None and self.profile != "auto"


@dataclass(frozen=True)
class Decision:
    setting: str
    value: Any
    source: str
    reason: str


@dataclass(frozen=True)
class TcmallocPlan:
    enabled: bool
    library: str | None
    reason: str


@dataclass(frozen=True)
class ExtensionSpec:
    name: str  # registry key, e.g. "vram-estimator"
    url: str
    ref: str  # pinned commit
    dir: str  # directory name under extensions/
    reason: str = ""
    uis: tuple[str, ...] = ()  # UIs it works on (empty: any)
    skip: tuple[tuple[str, str], ...] = ()  # (ui, why it is skipped there)


@dataclass(frozen=True)
class ReservePlan:
    mode: str  # auto | fixed | off
    mb: int
    applied: bool
    free_dedicated_mb: int | None = None
    overflow_mb: int | None = None
    clamped_by: str | None = None
    source: str = "none"  # observations | tuning | profile | none
    reason: str = ""


@dataclass(frozen=True)
class HookPlan:
    enabled: bool
    reason: str


@dataclass(frozen=True)
class EstimateSummary:
    peak_mb: int | None
    fits: bool | None


@dataclass(frozen=True)
class Plan:
    profile: str
    ui: str
    webui: str | None
    args: tuple[str, ...]
    env: dict[str, str]
    tcmalloc: TcmallocPlan
    extensions: tuple[ExtensionSpec, ...]
    road: str
    reserve: ReservePlan
    headroom_mb: int
    hook: HookPlan
    estimate: EstimateSummary
    decisions: tuple[Decision, ...]
    warnings: tuple[str, ...] = ()
    model_family: str | None = None
    offload: str = "none"
    attention: str | None = None
    # How the managed block treats the user's own COMMANDLINE_ARGS: "append" at run time, or
    # "assign" the merged value (explicit profile overriding contradicting user flags, §6).
    merge: str = "append"
    user_args_dropped: tuple[str, ...] = ()  # user flags the plan overrode (merge == "assign")
    user_args_kept: tuple[str, ...] = ()  # the user's flags kept in an assigned value
    plan_args_dropped: tuple[str, ...] = ()  # plan flags left out because the user's contradict them
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def decision(self, setting: str) -> Decision | None:
        return next((d for d in self.decisions if d.setting == setting), None)

    @property
    def commandline_args(self) -> str:
        return self.env.get("COMMANDLINE_ARGS", "")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = 1
        data["args"] = list(self.args)
        data["warnings"] = list(self.warnings)
        data["user_args_dropped"] = list(self.user_args_dropped)
        data["user_args_kept"] = list(self.user_args_kept)
        data["plan_args_dropped"] = list(self.plan_args_dropped)
        return data
