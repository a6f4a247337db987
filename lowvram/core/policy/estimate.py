"""Whether the plan fits: the estimator asked per rung (each once), the estimate step, and what to try
where the plan will not fit (docs/architecture.md#the-policy, "What fits")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lowvram.core.estimate import dit
from lowvram.core.estimate import memory as est
from lowvram.core.plan import EstimateSummary
from lowvram.core.policy.builder import Builder, GpuStep, Target, UiStep
from lowvram.ui import lineage_key

ESTIMATE_FAMILIES = est.FAMILIES
# The UIs that load what fits of a diffusion transformer and stream the rest from RAM every step by themselves
# (Forge: backend/memory_management.py load_models_gpu; ComfyUI: comfy/model_management.py load_models_gpu in
# its normal mode; SD.Next: its offload). A DiT that does not fit whole is no reason to climb their ladder.
STREAMING_UIS = ("forge", "comfyui", "sdnext")

SPILL_TOLERANCE_MB = 512
"""How far over the usable VRAM (no margin) a medvram level may be estimated where the driver spills
VRAM into RAM (sysmem fallback on) and still be run before --lowvram. What spills crosses PCIe at most
once per step that touches it (once per image where the peak is the text encoders or the VAE decode),
while --lowvram moves the whole UNet every step (4897 MiB for SDXL in fp16): 512 MiB is about a tenth
of that, so the spilling medvram run stays several times faster; an OOM moves the next plan down."""


def _est_attention(attention: str) -> str:
    """The estimator's backend for a planned one (a user's --opt-split-attention-v1 included)."""
    mapped = {"sdp-no-mem": "sdp", "auto": "sdp", "split-v1": "split", "invokeai": "split"}.get(attention, attention)
    return mapped if mapped in est.ATTENTIONS else "sdp"


def _est_offload(rung: str) -> str:
    return {"novram": "lowvram", "cpu": "none"}.get(rung, rung)


def request(family: str, *, width: int, height: int, batch: int, hires: float, precision: str, vae: str,
            attention: str, rung: str, ui_key: str, bcu: bool, weight_format: str = "") -> est.EstimateRequest:
    """The estimator's request for a planned rung (the plan's precisions, backend and the file's format)."""
    return est.EstimateRequest(family=family, width=width, height=height, batch=batch,
                               precision="full" if precision == "full" else "half",
                               vae_precision="full" if vae == "full" else "half", attention=_est_attention(attention),
                               offload=_est_offload(rung), hires_scale=hires, ui=lineage_key(ui_key), batch_cond_uncond=bcu,
                               weight_format=weight_format)


class Fits:
    """Whether a rung's estimate fits, estimating each rung once (the estimate summary reuses them)."""

    def __init__(self, fam: str, g: GpuStep, t: Target, *, unet: str, vae: str, attention: str,
                 ui_key: str, weight_format: str = "") -> None:
        self.estimates: dict[str, est.Estimate] = {}
        self.can_estimate = fam in ESTIMATE_FAMILIES and not g.cpu_mode and not g.foreign
        self._fam, self._g, self._t = fam, g, t
        self._unet, self._vae, self.attention, self.ui_key = unet, vae, attention, ui_key
        self.weight_format = weight_format  # the DiT file's stored format ("" = bf16)
        # A DiT on a UI that streams what does not fit: the ladder is not climbed for it (offload.py).
        self.streams = fam in dit.DIT_FAMILIES and lineage_key(ui_key) in STREAMING_UIS and self.can_estimate
        self.spill_possible = False  # set by the offload step: the driver spills VRAM into RAM (sysmem fallback on)
        self.scale = 1.0  # other UIs' runs of this model on this card: the estimate × this (policy/evidence.py)

    def __call__(self, rung: str) -> bool | None:
        vram_total = self._g.vram_total
        if not self.can_estimate or vram_total is None:
            return None
        if rung not in self.estimates:
            e = est.estimate(self.request(rung))
            if self.scale > 1.0:
                more = round(e.peak_mb * (self.scale - 1.0))
                e = replace(e, peak_mb=e.peak_mb + more, parts={**e.parts, "measured_in_other_uis": more})
            self.estimates[rung] = e
        return est.fits(self.estimates[rung].peak_mb, vram_total, self._g.room)

    def request(self, rung: str) -> est.EstimateRequest:
        """The estimator's request for `rung` at the plan's target, precisions, backend and weight format."""
        t = self._t
        return request(self._fam, width=t.width, height=t.height, batch=t.batch, hires=t.hires, precision=self._unet,
                       vae=self._vae, attention=self.attention, rung=rung, ui_key=self.ui_key, bcu=t.bcu,
                       weight_format=self.weight_format)


def medvram_above_lowvram(rungs: Sequence[str]) -> str | None:
    """The UI's medvram level just above its lowvram (medvram-sdxl for SDXL on A1111), if it has one."""
    if "lowvram" not in rungs or rungs.index("lowvram") == 0:
        return None
    above = rungs[rungs.index("lowvram") - 1]
    return above if above in ("medvram", "medvram-sdxl") else None


def tight_fit(fits: Fits, rung: str) -> str | None:
    """Why `rung` may run though its estimate misses the 10 % margin: it fits with no margin, or, where
    the driver spills VRAM into RAM, is over by at most SPILL_TOLERANCE_MB. None where it is not that close."""
    vram_total = fits._g.vram_total
    if fits(rung) is None or vram_total is None:
        return None
    e, usable = fits.estimates[rung], vram_total - fits._g.room
    over = e.peak_mb - usable
    if over <= 0:
        return f"fits with no margin to spare ({e.peak_mb} of {usable} MiB)"
    if not fits.spill_possible or over > SPILL_TOLERANCE_MB:
        return None
    if e.phase in ("text_encode", "vae_decode"):
        when = f"once per image (the {e.phase.replace('_', ' ')})"
    else:
        when = (f"at most {over} MiB across PCIe a step, against the {e.parts.get('weights_unet', 0)} MiB "
                "of UNet --lowvram moves every step")
    return f"over by {over} MiB ({e.peak_mb} of {usable} MiB), which the driver spills to RAM: {when}"


def decide_estimate(b: Builder, fam: str, u: UiStep, g: GpuStep, *, t: Target, fits: Fits, offload: str,
                   road: str, rungs: Sequence[str], unet: str, vae: str, attention: str) -> EstimateSummary:
    """The estimate summary, and what to try where the plan will not fit."""
    vram_total, room = g.vram_total, g.room
    fits.attention = attention  # a user's backend that won the merge counts for estimates made from here on
    fit = fits(offload) if not g.cpu_mode else None
    peak = fits.estimates[offload].peak_mb if offload in fits.estimates else None
    # A medvram level that misses the margin but is this close is run before --lowvram (offload.py).
    tight = tight_fit(fits, offload) if fit is False and offload == medvram_above_lowvram(rungs) else None
    if peak is not None:
        verdict = "fits" if fit else "does not fit"
        streams = ""
        if fits.streams:  # policy/dit.py's streaming decision says what streams and what it costs
            verdict += " whole"
            streams = "" if fit else f": {u.ui.title} streams the rest from RAM every step"
        what = f"{fam} ({fits.weight_format or 'bf16'})" if fam in dit.DIT_FAMILIES else fam
        b.add("estimate", peak, "auto",
              f"{what} {t.width}×{t.height} batch {t.batch}, offload {offload}: peak {peak} MiB vs "
              f"{vram_total} MiB − {room} MiB kept free ({verdict} with a "
              f"{int(est.DEFAULT_MARGIN * 100)} % margin" + (f"; {tight}" if tight else "") + streams + ")")
    elif fits.can_estimate:
        b.add("estimate", None, "auto", "the GPU's VRAM size is unknown: no estimate")
    if fit is False and road == "swap" and not tight and not fits.streams:
        b.warn(_wont_fit(fam, width=t.width, height=t.height, offload=offload, rungs=rungs, vram_total=vram_total,
                         room=room, unet=unet, vae=vae, attention=attention, ui_key=u.key, bcu=t.bcu,
                         batch=t.batch, hires=t.hires, weight_format=fits.weight_format))
    return EstimateSummary(peak, fit)


def _wont_fit(fam: str, *, width: int, height: int, offload: str, rungs: Sequence[str], vram_total: int | None,
              room: int, unet: str, vae: str, attention: str, ui_key: str, bcu: bool, batch: int,
              hires: float, weight_format: str = "") -> str:
    text = f"{fam} at {width}×{height} is estimated not to fit {vram_total} MiB with offload {offload}"
    parts: list[str] = []
    if vram_total:
        req = request(fam, width=width, height=height, batch=batch, hires=hires, precision=unet, vae=vae,
                      attention=attention, rung=offload, ui_key=ui_key, bcu=bcu, weight_format=weight_format)
        side = est.max_square_px(req, vram_total, room)
        if side:
            parts.append(f"a smaller size (up to about {side}×{side})")
        tiled = est.estimate(est.EstimateRequest(**{**req.__dict__, "tiled_vae": True}))
        if est.fits(tiled.peak_mb, vram_total, room):
            parts.append("tiled VAE decoding")
    lower = [r for r in rungs if rungs.index(r) > rungs.index(offload)] if offload in rungs else []
    if lower:
        parts.append(f"--offload {lower[0]}")
    if batch > 1:
        parts.append("batch 1")
    return text + (": try " + ", ".join(parts) if parts else "")
