"""The environment the UI starts with: the allocator settings (less those that fight the layout),
TCMalloc, the torch build the UI's first start installs, and the variables the launch sets."""

from __future__ import annotations

from collections.abc import Mapping

from lowvram.core import torch_builds as tb
from lowvram.core.facts import Facts, GpuFacts
from lowvram.core.markers import UNSET_ONLY_ENV
from lowvram.core.plan import HookPlan, ReservePlan, TcmallocPlan
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, Merge, UiStep
from lowvram.core.policy.flags import join_args
from lowvram.ui.base import UiAdapter

ALLOC_LAYOUT_CONFLICTS = {
    "max_split_size_mb": "stops the freed reserve block from serving smaller requests",
    "backend": "cudaMallocAsync bypasses PyTorch's block cache, which the reserve relies on",
    "expandable_segments": "changes how segments map physical pages; untested with the reserve",
    "garbage_collection_threshold": "acts only after set_per_process_memory_fraction, which A1111 never calls",
}


def decide_allocator(b: Builder, inp: Inputs, reserve: ReservePlan) -> str:
    alloc = dict(inp.prof.alloc_conf)
    if reserve.applied:
        for key in list(alloc):
            if key in ALLOC_LAYOUT_CONFLICTS and (key != "backend" or "cudaMallocAsync" in alloc[key]):
                b.add(f"alloc_conf.{key}", None, "auto", "dropped while the model is kept in VRAM with a reserve: "
                                                        f"{ALLOC_LAYOUT_CONFLICTS[key]}")
                del alloc[key]
    for key, value in alloc.items():
        b.add(f"alloc_conf.{key}", value, "profile", f"profile {inp.prof.name}")
    return ",".join(f"{k}:{v}" for k, v in alloc.items())


def decide_tcmalloc(b: Builder, inp: Inputs, u: UiStep) -> tuple[TcmallocPlan, dict[str, str]]:
    prof = inp.prof
    tc, tc_env = _tcmalloc(inp.facts, u.ui, prof.tcmalloc)
    b.add("tcmalloc", tc.enabled, "profile" if prof.tcmalloc != "auto" else "auto", tc.reason)
    return tc, tc_env


def _tcmalloc(facts: Facts, ui: UiAdapter, wanted: str) -> tuple[TcmallocPlan, dict[str, str]]:
    tc = facts.tcmalloc
    if facts.system.os != "linux":
        return TcmallocPlan(False, None, f"TCMalloc is preloaded only on Linux ({facts.system.os} here)"), {}
    if not ui.supports_tcmalloc:
        return TcmallocPlan(False, None, f"{ui.title}'s launcher does not preload TCMalloc"), {}
    if wanted == "off":
        return TcmallocPlan(False, None, "profile turns TCMalloc off"), {"NO_TCMALLOC": "1"}
    if tc.usable and tc.library:
        return (TcmallocPlan(True, tc.library, f"preloading {tc.library} (less RAM bloat when swapping checkpoints)"),
                {"LD_PRELOAD": tc.library})
    if tc.library:
        return (TcmallocPlan(False, tc.library, f"{tc.library} is not usable ({tc.reason}): NO_TCMALLOC keeps "
                             "webui.sh from preloading it"), {"NO_TCMALLOC": "1"})
    hint = f" (install {tc.package})" if tc.package else ""
    return TcmallocPlan(False, None, f"no TCMalloc library found{hint}"), {}


def decide_torch_install(b: Builder, inp: Inputs, u: UiStep, g: GpuStep) -> dict[str, str]:
    """CPU mode with no NVIDIA GPU: the UI's first start installs torch's CPU build, not the CUDA one
    it installs by default; an NVIDIA GPU older than the UI's default build supports gets a CUDA 12.6
    build (docs/architecture.md#the-policy, "Torch install"). Returns the variable to set."""
    if g.gpu is not None and not g.cpu_mode:
        return _torch_for_card(b, inp, u, g.gpu)
    if not g.cpu_mode or g.gpu is not None:
        return {}  # another GPU (its own setup stands), or CPU mode chosen on an NVIDIA GPU (its CUDA build is right)
    ui, webui = u.ui, inp.facts.webui
    cmd = ui.cpu_torch_command(u.version)
    if inp.facts.system.os == "darwin":
        b.add("torch_install", None, "auto", "macOS: PyPI's torch has no CUDA libraries; the UI's own choice stands")
        return {}
    if webui is not None and webui.flavor == u.key and webui.torch:
        b.add("torch_install", None, "auto", f"the venv already has torch {webui.torch}; {ui.title} installs torch "
                                            "only when it is missing")
        return {}
    if ui.torch_command_env is None:
        b.add("torch_install", "cpu", "auto", f"no NVIDIA GPU: {ui.title} has no installer; install torch's CPU "
                                             f"build yourself: {cmd}")
        return {}
    name = ui.torch_command_env  # in UNSET_ONLY_ENV: the block sets it only where nothing before it did
    b.add("torch_install", "cpu", "auto",
          f"no NVIDIA GPU: {ui.title}'s first start installs torch's CPU build (about 0.2 GB) instead of its CUDA "
          f"build (about 2.3 GB), through {name}; set only where {name} is unset: a {name} of yours "
          "(environment or webui-user) wins")
    return {name: cmd} if name in UNSET_ONLY_ENV else {}


# The torch each UI's first start installs on an NVIDIA machine (lowvram/data/uis.json, "no-torch"). A1111
# 1.8–1.10 and Forge: cu121, which runs from sm_50; SD.Next: cu130, from sm_75. ComfyUI has no installer
# (setup's commands take the cu126 index). Forge Neo: 2.11.0+cu130 (its README and launch_utils), from sm_75;
# reForge: 2.9.0 from the cu128 index (launch_utils), from sm_70.
UI_DEFAULT_TORCH = {"a1111": "2.1.2+cu121", "forge": "2.3.1+cu121", "sdnext": "2.12.0+cu130", "forge-neo": "2.11.0+cu130",
                    "reforge": "2.9.0+cu128"}
TORCH_COMMAND_IS_PIP_ARGS = ("sdnext",)  # installer.py: `pip install $TORCH_COMMAND`; A1111/Forge: `python -m …`


def _torch_for_card(b: Builder, inp: Inputs, u: UiStep, gpu: GpuFacts) -> dict[str, str]:
    """A card the UI's torch has no kernels for (Maxwell/Pascal under cu128+, Volta under cu130): pin a CUDA
    12.6 build where the UI still has to install torch; say how to replace one the venv already has."""
    ui, webui, cc = u.ui, inp.facts.webui, gpu.cc_tuple
    card = f"{(gpu.name or 'this GPU').removeprefix('NVIDIA ').removeprefix('GeForce ')}"
    if webui is not None and webui.flavor == u.key and webui.torch:
        floor = tb.no_kernels_for(webui.torch, webui.torch_cuda, cc)
        if floor is None or cc is None:
            return {}
        text = (f"the venv's torch {webui.torch} has no kernels for the {card} ({tb.cc_text(cc)}; its build starts at "
                f"{tb.cc_text(floor)}), and {ui.title} installs torch only when it is missing: replace it with "
                f"`{tb.venv_pip_command(webui.python, inp.facts.system.os, webui.torch)}`")
        b.add("torch_install", None, "auto", text)
        b.warn(text)
        return {}
    default = UI_DEFAULT_TORCH.get(u.key)
    floor = tb.no_kernels_for(default, None, cc) if default else None
    if floor is None or cc is None or default is None:
        return {}
    legacy = tb.legacy_build(default)[0]
    name = ui.torch_command_env
    why = (f"the {card} ({tb.cc_text(cc)}) is older than the torch {ui.title} installs ({default}, kernels from "
           f"{tb.cc_text(floor)})")
    if name is None:
        b.add("torch_install", tb.LEGACY_CUDA, "auto", f"{why}: install torch {legacy} yourself: "
                                                     f"pip install {tb.legacy_pip_args(default)}")
        return {}
    args = tb.legacy_pip_args(default)
    b.add("torch_install", tb.LEGACY_CUDA, "auto",
          f"{why}: its first start installs torch {legacy} instead (CUDA 12.6 wheels, kernels from sm_50), through "
          f"{name}; set only where {name} is unset: a {name} of yours wins")
    value = args if u.key in TORCH_COMMAND_IS_PIP_ARGS else f"pip install {args}"
    return {name: value} if name in UNSET_ONLY_ENV else {}


def decide_env(b: Builder, u: UiStep, g: GpuStep, m: Merge, *, tc_env: Mapping[str, str], alloc_conf: str,
               hook: HookPlan, hook_config_path: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if u.ui.has_webui_user:
        merged_args = [*m.user_kept, *m.plan_args] if m.merge == "assign" else m.plan_args
        env["COMMANDLINE_ARGS"] = join_args(merged_args)
    env.update(tc_env)
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    if g.choice.pin_uuid:
        env["CUDA_VISIBLE_DEVICES"] = g.choice.pin_uuid
        b.add("cuda_visible_devices", g.choice.pin_uuid, "auto",
              "several NVIDIA GPUs: the chosen one is pinned by UUID, so it is CUDA device 0 whatever the order")
    if hook.enabled and hook_config_path:
        env["LOWVRAM_CONFIG"] = hook_config_path
    return env
