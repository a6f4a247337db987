"""What other UIs learnt about this model on this GPU (issue 19 item 5; docs/architecture.md#observations-back-into-the-plan).

Runs of the same model file (its content, wherever it lies) on the same card, recorded for another WebUI
tree, are evidence of the model's memory: a run that ran out of memory, a measured peak. They correct the
estimate every rung is sized by (Fits.scale), never below what the estimator says. One UI's own knobs
(A1111's reserve and layout, Forge's inference memory and swap, ComfyUI's --reserve-vram) are never taken
from them: those decisions read this tree's observations only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lowvram.core.estimate.calibration import measured_scale
from lowvram.core.observations import OtherTreeRuns
from lowvram.core.policy.builder import Builder, GpuStep
from lowvram.core.policy.estimate import Fits

MIN_SCALE_SHOWN = 1.02  # closer than this the runs agree with the estimate


def decide_evidence(b: Builder, other_runs: Sequence[OtherTreeRuns], g: GpuStep, fits: Fits) -> Fits:
    """Set `fits.scale` from other trees' runs and say where the evidence came from (nothing without any)."""
    runs = [o for tree in other_runs for o in tree.runs]
    if not runs or not fits.can_estimate or g.vram_total is None:
        return fits
    template = replace(fits.request("none"), tiled_vae=False)
    measured = measured_scale(template, runs, usable_mb=g.vram_total - g.room, room_mb=g.room)
    where = "; ".join(tree.describe() for tree in other_runs)
    if measured.scale < MIN_SCALE_SHOWN:
        b.add("evidence", 1.0, "observations", f"{where}: they agree with the estimate")
        return fits
    fits.scale = measured.scale
    said = ", ".join(part for part in (
        f"{measured.ooms} ran out of memory" if measured.ooms else "",
        f"{measured.peaks} measured a peak" if measured.peaks else "") if part)
    b.add("evidence", round(measured.scale, 2), "observations",
          f"{where} ({said}): this model needs about {measured.scale:.2f}× what the estimate says on this card, "
          "so every offload level is sized by the estimate × that; this UI's own memory settings are not "
          "taken from another UI")
    return fits
