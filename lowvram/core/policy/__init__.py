"""The policy engine: facts + profile + observations + overrides → Plan. Pure: no I/O, no probing.

Every setting is a Decision with its value, where it came from (cli, profile, auto, user,
remembered, observations, tuning) and why, so `lowvram plan` can explain itself and the whole
policy can be tested for every card in the matrix on a machine without a GPU (docs/architecture.md#the-policy).

This package's face: `compose.plan()` runs the decision steps, one module per group of settings
(`family`, `hardware`, `attention`, `precision`, `offload`, `road`, `reserve`, `flags`, `environment`,
`extensions`, `estimate`); `builder` holds what the steps share.
"""

from __future__ import annotations

from lowvram.core.policy.attention import xformers_usable
from lowvram.core.policy.builder import RoadChoice
from lowvram.core.policy.compose import plan
from lowvram.core.policy.family import FamilyChoice, require_family, resolve_family
from lowvram.core.policy.flags import join_args
from lowvram.core.policy.hardware import choose_gpu, gpu_for, headroom_floor, headroom_mb, target_ui, webui_gpu
from lowvram.core.policy.offload import map_rung
from lowvram.core.policy.road_history import FAILURE_TEXT

__all__ = [
    "FAILURE_TEXT",
    "FamilyChoice",
    "RoadChoice",
    "choose_gpu",
    "gpu_for",
    "headroom_floor",
    "headroom_mb",
    "join_args",
    "map_rung",
    "plan",
    "require_family",
    "resolve_family",
    "target_ui",
    "webui_gpu",
    "xformers_usable",
]
