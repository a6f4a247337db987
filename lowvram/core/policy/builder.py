"""What the decision steps share: the Builder they record Decisions on, the inputs every step reads,
and the small records one step hands the next (docs/architecture.md#the-policy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowvram.core.facts import Facts, GpuFacts
from lowvram.core.gpuselect import GpuChoice
from lowvram.core.observations import Observation
from lowvram.core.plan import Decision, Overrides
from lowvram.core.profiles import Profile, ResolvedProfile
from lowvram.ui.base import FlagSet, ParsedFlag, UiAdapter


@dataclass
class Builder:
    """The Decisions and warnings the steps record, in the order `lowvram plan` shows them."""

    decisions: list[Decision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, setting: str, value: Any, source: str, reason: str) -> None:
        self.decisions.append(Decision(setting, value, source, reason))

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


@dataclass(frozen=True)
class RoadChoice:
    """A road, where the choice came from and why, and a warning the plan repeats (if any)."""

    road: str
    source: str
    reason: str
    warning: str | None = None


@dataclass(frozen=True)
class Inputs:
    """What every step may read: the facts, the resolved profile, the observations and the overrides."""

    facts: Facts
    resolved: ResolvedProfile
    observations: Sequence[Observation]
    overrides: Overrides
    webui_path: str | None
    xformers_builds: Mapping[str, str] | None

    @property
    def prof(self) -> Profile:
        return self.resolved.profile


@dataclass(frozen=True)
class UiStep:
    """The UI decided, with its adapter, version and the user's own flags (literal COMMANDLINE_ARGS)."""

    key: str
    ui: UiAdapter
    version: str | None
    flagset: FlagSet
    user_tokens: tuple[str, ...]
    user_literal: bool
    user_parsed: list[ParsedFlag]
    user_device: str | None


@dataclass(frozen=True)
class GpuStep:
    """The GPU decided, and the mode it puts the plan in (an NVIDIA GPU, a foreign one, CPU, as written)."""

    choice: GpuChoice
    device_warning: str | None
    foreign: bool
    cpu_mode: bool
    as_written: bool
    room: int

    @property
    def gpu(self) -> GpuFacts | None:
        return self.choice.gpu

    @property
    def vram_total(self) -> int | None:
        return self.choice.gpu.vram_total_mb if self.choice.gpu else None

    @property
    def no_nvidia(self) -> bool:
        return self.cpu_mode or self.foreign


@dataclass(frozen=True)
class Target:
    """The size the plan is sized for: the profile's, else the family's native side."""

    width: int
    height: int
    batch: int
    hires: float
    bcu: bool


@dataclass(frozen=True)
class Merge:
    """The plan's flags merged with the user's, and the settings a user's flag took over."""

    merge: str
    user_dropped: list[str]
    user_kept: list[str]
    plan_dropped: list[str]
    plan_args: list[str]
    offload: str
    attention: str
