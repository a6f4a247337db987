"""The profile's extensions, kept where lowvram's registry knows them and they work on this UI."""

from __future__ import annotations

from collections.abc import Mapping

from lowvram.core.plan import ExtensionSpec
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, UiStep


def decide_extensions(b: Builder, inp: Inputs, u: UiStep, g: GpuStep,
                     registry: Mapping[str, ExtensionSpec]) -> list[ExtensionSpec]:
    prof = inp.prof
    exts: list[ExtensionSpec] = []
    for name in prof.extensions:
        spec = registry.get(name)
        if spec is None:
            b.warn(f"profile {prof.name} lists extension {name!r}, which is not in lowvram's registry: skipped")
            continue
        uis = getattr(spec, "uis", ()) or ()
        if uis and u.key not in uis:
            skip = dict(getattr(spec, "skip", ()) or ())
            b.add(f"extension.{name}", "skipped", "auto", skip.get(u.key) or f"{name} does not work on {u.ui.title}")
            continue
        if g.cpu_mode and name == "vram-estimator":
            b.add(f"extension.{name}", "skipped", "auto", "VRAM Estimator benchmarks CUDA memory; there is no GPU")
            continue
        exts.append(spec)
        b.add(f"extension.{name}", "install", "profile", spec.reason or f"listed by profile {prof.name}")
    return exts
