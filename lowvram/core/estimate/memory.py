"""Peak VRAM of one Stable Diffusion generation, from physics rather than a per-batch curve fit.

The peak is the largest of the phases of a generation (text encode, UNet sampling, VAE decode,
and the hires UNet pass, encode and decode), each being what the offload mode keeps resident in
that phase plus that phase's working memory. Every term is a product of real sizes (parameter
counts × bytes, latent tokens × channels, attention score matrices), so the model generalises to
sizes and batches nobody measured, stays monotone and smooth (VRAM Estimator's per-batch cubics
jump when only the batch changes), and a handful of free coefficients (`Coefficients`) can be
calibrated from an install's own observations (lowvram.core.estimate.calibration).

Pure core: no I/O, no imports from detect/apply/cli; one call costs a few microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

from lowvram.core.errors import UsageError
from lowvram.core.estimate import dit
from lowvram.core.estimate.formats import FORMATS, WeightFormat, weight_format, weights_bytes

MIB = 1024 * 1024

DEFAULT_MARGIN = 0.10
"""The estimator's own error until measured on this install (docs/architecture.md#the-policy)."""

CUDA_CONTEXT_MB = 450
"""CUDA context + cuDNN/cuBLAS handles and kernels: memory the card holds outside torch's allocator."""

SD_FAMILIES = ("sd15", "sd2", "sdxl", "sdxl-refiner")
FAMILIES = SD_FAMILIES + dit.DIT_FAMILIES
PRECISIONS = ("half", "full")
ATTENTIONS = ("none", "split", "sub-quad", "xformers", "sdp")
OFFLOADS = ("none", "medvram-sdxl", "medvram", "lowvram")
UIS = ("a1111", "forge", "sdnext", "comfyui")

_SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
_TEXT_TOKENS = 77


@dataclass(frozen=True)
class FamilySpec:
    """Architecture facts of a model family (reference/vram_data.md §2)."""

    unet_params: float  # parameters
    text_params: float
    vae_params: float
    # (pixel downscale, heads) of each UNet level that has attention: the score matrix of a level
    # is heads × T², T = (H/ds)(W/ds) tokens.
    attn_levels: tuple[tuple[int, int], ...]
    lowvram_block_frac: float  # the largest single UNet block A1111's --lowvram moves, as a share of the UNet
    text_width: int  # hidden width of the text encoder(s), for the (tiny) text-encode activations


SPECS: dict[str, FamilySpec] = {
    # SD1.x: 859.52 M UNet, CLIP ViT-L 123.06 M, VAE 83.65 M; attention at 1/8, 1/16, 1/32 with 8 heads.
    "sd15": FamilySpec(859.52e6, 123.06e6, 83.65e6, ((8, 8), (16, 8), (32, 8)), 0.115, 768),
    # SD2.x: 865.9 M UNet, OpenCLIP ViT-H text tower 354 M; head dim 64 → 5/10/20 heads.
    "sd2": FamilySpec(865.91e6, 354.03e6, 83.65e6, ((8, 5), (16, 10), (32, 20)), 0.115, 1024),
    # SDXL: 2567.46 M UNet, CLIP-L + OpenCLIP bigG 817.72 M; no attention at 1/8; 10 heads at 1/16, 20 at 1/32.
    "sdxl": FamilySpec(2567.46e6, 817.72e6, 83.65e6, ((16, 10), (32, 20)), 0.15, 2048),
    # SDXL refiner: ~2.26 B UNet (384 base channels), bigG only 694.66 M; 12 heads at 1/16, 24 at 1/32.
    "sdxl-refiner": FamilySpec(2260e6, 694.66e6, 83.65e6, ((16, 12), (32, 24)), 0.15, 1280),
}


# The UNet's latent levels, level 0 at the latent's own resolution (1/8 of the image's side): (channels,
# whether the level has transformer blocks). Configs: SD1 v1-inference.yaml (320·[1,2,4,4], attention at
# ds 1, 2, 4); SD2 the same widths; SDXL sd_xl_base.yaml (320·[1,2,4], transformer_depth [0,2,10]: none at
# the highest resolution); the refiner 384·[1,2,4,4], attention at ds 2 and 4 (reference/vram_data.md §2).
UNET_LEVELS: dict[str, tuple[tuple[int, bool], ...]] = {
    "sd15": ((320, True), (640, True), (1280, True), (1280, False)),
    "sd2": ((320, True), (640, True), (1280, True), (1280, False)),
    "sdxl": ((320, False), (640, True), (1280, True)),
    "sdxl-refiner": ((384, False), (768, True), (1536, True), (1536, False)),
}

UNET_ACT_FIT = 1.29
"""What the derivation below leaves free: cuDNN/cuBLAS workspaces, attention-backend buffers, temporaries the
count misses. Fitted on the reference rows marked "calibration" only (benchmarks/estimate_errors.py prints
the fit and the errors on the "validation" rows it never saw; tests/unit/test_estimate.py checks both)."""


def derived_unet_act(levels: tuple[tuple[int, bool], ...]) -> float:
    """Live elements per latent pixel at the peak of one UNet forward (one batch element), from the architecture.

    ldm/sgm layout (A1111, Forge, ComfyUI), two res blocks per level down and three up, the skip of
    every block kept on a stack (conv_in, 2 per level, 1 per downsample) until the up path pops it.
    A level at ds = 2^i holds C/4^i elements per latent pixel per channel-width C. At a transformer
    block the peak is its GEGLU feed-forward: proj to 8C, gelu of half (4C), the product (4C), plus the
    block's input, its residual stream and norm3 (3C): 19C, on top of the skips still held. A res
    block holds cat(h, skip), its GroupNorm and its SiLU (3 × the concatenated width). So:

    - SD1.5: the skips before down-L0's second transformer are conv_in + L0 res1 = 640; 19 × 320 =
      6080; peak 6720 (up-L0's first transformer ties: 19 × 320 + the 2 L0 skips left).
    - SDXL: level 0 has no attention; its res blocks peak at 3 × 960 + 640 = 3520. At ds 2 (640 ch, a
      quarter of the tokens) 19 × 640 / 4 = 3040 plus the skips held (conv_in + 2 × 320 + 320/4 +
      640/4 = 1200): 4240 — 0.63 of SD1.5's, because its widest attention sees a quarter of the tokens.
    - SD2 as SD1.5 (same widths; heads change the attention, not these tensors); refiner 5088.

    ComfyUI's `memory_usage_factor` (comfy/supported_models.py: SD1.5 1.0, SDXL 0.8; model_base.py
    memory_required: area × dtype bytes × 0.01 × factor MiB, i.e. ≈ 10.5k and 8.4k elements per latent
    pixel) is a cross-check: deliberately generous, same order, SDXL below SD1.5 as here.
    """
    scale = [4.0**i for i in range(len(levels))]
    held: list[float] = [float(levels[0][0])]  # conv_in's output
    peak = 0.0
    prev = float(levels[0][0])
    for i, (ch, attn) in enumerate(levels):  # down path
        for _ in range(2):
            width = ch / scale[i]
            peak = max(peak, sum(held) + 3 * prev / scale[i] + width)
            if attn:
                peak = max(peak, sum(held) + 19 * width)
            held.append(width)
            prev = ch
        if i + 1 < len(levels):
            held.append(ch / scale[i + 1])
    h = levels[-1][0] / scale[-1]
    for i in reversed(range(len(levels))):  # up path
        ch, attn = levels[i]
        for _ in range(3):
            skip = held.pop()
            peak = max(peak, sum(held) + 3 * (h + skip))
            h = ch / scale[i]
            if attn:
                peak = max(peak, sum(held) + 19 * h)
        if i > 0:
            h = ch / scale[i - 1]  # the upsample keeps the channels at 4× the pixels
    return peak


def default_unet_act(fit: float = UNET_ACT_FIT) -> dict[str, float]:
    """`Coefficients.unet_act`: the derivation × the one fitted scale, the same for every family."""
    return {fam: round(fit * derived_unet_act(levels)) for fam, levels in UNET_LEVELS.items()}


@dataclass(frozen=True)
class Coefficients:
    """The model's free coefficients: physics sets their form, reference figures their values.

    `unet_act` is the UNet's working memory in elements per latent pixel per UNet batch element
    (the skips held plus the GEGLU feed-forward of the transformer level with the most elements:
    `derived_unet_act`, times the one scale `UNET_ACT_FIT` fitted on calibration rows). `vae_decode` is elements per output pixel of one
    image's decode (the 128/256-channel full-resolution convolutions dominate). Naive attention
    holds `naive_score_bytes` bytes per score element (A1111's ldm computes scores in fp32 and keeps
    two copies: 8 B); Doggettx split attention keeps two copies in the compute dtype but slices
    itself to the free memory, modelled as a smooth cap `split_cap_mb`.
    """

    # derived_unet_act() per family × UNET_ACT_FIT (fitted on the calibration rows only).
    unet_act: dict[str, float] = field(default_factory=default_unet_act)
    # VAE decode, elements per output pixel. A1111's ldm/sgm decoder spells SiLU as x*sigmoid(x): more
    # temporaries than a diffusers/ComfyUI decoder (F.silu). A1111 decodes in the VAE's own dtype with
    # autocast off (decode_first_stage disabled it for a dtype_vae input even in early 2023; 1.6+ wraps
    # it in devices.without_autocast): no fp32 GroupNorm copies.
    vae_decode: dict[str, float] = field(
        default_factory=lambda: {"ldm": 1100.0, "silu": 720.0}
    )
    vae_encode_ratio: float = 0.65  # encode working memory relative to decode at the same size
    naive_score_bytes: float = 8.0  # A1111/ldm naive attention (fp32 scores, 2 copies)
    naive_score_elems: float = 2.0  # diffusers/ComfyUI naive attention: 2 copies in the compute dtype
    split_score_elems: float = 2.0  # Doggettx: 2 copies in the compute dtype before it slices
    split_cap_mb: float = 3600.0  # where Doggettx starts slicing (it sizes slices to the free memory)
    sdp_extra: float = 0.06  # SDP needs a little more than xFormers (A1111 wiki)
    subquad_extra: float = 0.10  # sub-quadratic's chunk buffers
    slack_working: float = 0.12  # allocator slack on working memory (fragmentation)
    slack_weights: float = 0.02  # allocator slack on weights (block rounding)
    extra_mb: float = 0.0  # other tensors this install keeps on the GPU (fitted from observations)
    act_scale: float = 1.0  # calibration multiplier on UNet working memory (incl. attention)
    vae_scale: float = 1.0  # calibration multiplier on VAE working memory
    context_mb: float = float(CUDA_CONTEXT_MB)

    def with_(self, **changes: object) -> Coefficients:
        return replace(self, **changes)  # type: ignore[arg-type]


DEFAULT_COEFFICIENTS = Coefficients()


class Calibrated(Protocol):
    """What the estimate needs from a calibration (`lowvram.core.estimate.calibration.Calibration` is one): its
    fitted coefficients. A Protocol, so this module never imports the calibration that builds on it."""

    @property
    def coefficients(self) -> Coefficients: ...


@dataclass(frozen=True)
class EstimateRequest:
    family: str  # sd15 | sd2 | sdxl | sdxl-refiner
    width: int
    height: int
    batch: int = 1
    precision: str = "half"  # half | full   (UNet/text encoders)
    vae_precision: str = "half"  # half | full   (A1111 upcasts the VAE where --no-half-vae)
    attention: str = "sdp"  # none | split | sub-quad | xformers | sdp
    offload: str = "none"  # none | medvram-sdxl | medvram | lowvram
    hires_scale: float = 1.0
    ui: str = "a1111"  # a1111 | forge | sdnext | comfyui
    batch_cond_uncond: bool = True
    tiled_vae: bool = False
    # The diffusion model's stored format (doctor's model_format: fp16, fp8_e4m3fn, nf4, q4_k_s, …); "" = the
    # precision's own (fp16/bf16 for half, fp32 for full). T5-XXL's format for the DiT families; "" = fp8_e4m3fn
    # where the model itself is quantised (fp8, NF4, GGUF: what low-VRAM guides pair it with), else fp16.
    weight_format: str = ""
    text_format: str = ""


@dataclass(frozen=True)
class Estimate:
    peak_mb: int  # what the card must hold: torch peak + allocator slack + context
    torch_peak_mb: int  # what torch.cuda.max_memory_allocated() would show
    parts: dict[str, int]  # named parts of peak_mb (they add up to it)
    phase: str = ""  # the phase that sets the peak
    phases: dict[str, int] = field(default_factory=dict)  # torch peak of every phase, MiB


def validate(req: EstimateRequest) -> None:
    """Refuse a request the model cannot answer, with a hint (bad CLI input must not traceback)."""
    choices = {
        "family": (req.family, FAMILIES),
        "precision": (req.precision, PRECISIONS),
        "vae_precision": (req.vae_precision, PRECISIONS),
        "attention": (req.attention, ATTENTIONS),
        "offload": (req.offload, OFFLOADS),
        "ui": (req.ui, UIS),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise UsageError(f"unknown {name.replace('_', '-')} {value!r}", f"use one of: {', '.join(allowed)}")
    for fmt in (req.weight_format, req.text_format):
        if fmt:
            weight_format(fmt)
    if req.width < 8 or req.height < 8 or req.width > 16384 or req.height > 16384:
        raise UsageError(
            f"image size {req.width}x{req.height} is out of range", "use a width and height between 8 and 16384"
        )
    if req.batch < 1 or req.batch > 256:
        raise UsageError(f"batch size {req.batch} is out of range", "use a batch size between 1 and 256")
    if not (1.0 <= req.hires_scale <= 8.0) or math.isnan(req.hires_scale):
        raise UsageError(f"hires scale {req.hires_scale} is out of range", "use a hires scale between 1 and 8")


def model_format(req: EstimateRequest) -> WeightFormat:
    """The diffusion model's stored format: the request's, else its precision's (bf16 for a DiT, fp16 for a UNet)."""
    if req.weight_format:
        return weight_format(req.weight_format)
    if req.precision == "full":
        return FORMATS["fp32"]
    return FORMATS["bf16" if req.family in dit.DIT_FAMILIES else "fp16"]


def t5_format(req: EstimateRequest) -> WeightFormat | None:
    """T5-XXL's format; None where the UI leaves it unloaded (A1111 1.10 runs SD3 without T5 unless told)."""
    if req.text_format:
        return weight_format(req.text_format)
    if req.ui == "a1111":
        return None
    return FORMATS["fp16" if model_format(req).kind == "float" else "fp8_e4m3fn"]


def effective_offload(family: str, offload: str) -> str:
    """`--medvram-sdxl` is `--medvram` for SDXL models only and nothing for the others."""
    if offload == "medvram-sdxl":
        return "medvram" if family in _SDXL_FAMILIES else "none"
    return offload


def _elem(precision: str) -> int:
    return 2 if precision == "half" else 4


@dataclass(frozen=True)
class _Resident:
    unet: float
    text: float
    vae: float


def _residency(spec: FamilySpec, req: EstimateRequest, offload: str, phase: str) -> _Resident:
    """Bytes of weights on the GPU during a phase under the offload mode."""
    unet = weights_bytes(spec.unet_params, model_format(req)) if req.weight_format else spec.unet_params * _elem(req.precision)
    text = spec.text_params * _elem(req.precision)
    vae = spec.vae_params * _elem(req.vae_precision)
    swaps_whole_modules = offload in ("medvram", "lowvram") or (req.ui in ("forge", "comfyui") and offload == "none")
    if not swaps_whole_modules:
        return _Resident(unet, text, vae)
    if offload == "lowvram":
        # A1111 --lowvram moves one UNet block at a time; SD.Next's sequential offload one layer.
        unet *= 0.03 if req.ui == "sdnext" else spec.lowvram_block_frac
        if req.ui == "sdnext":
            text *= 0.05
    if phase == "text":
        return _Resident(0.0, text, 0.0)
    if phase == "unet":
        return _Resident(unet, 0.0, 0.0)
    return _Resident(0.0, 0.0, vae)


def _attention_bytes(spec: FamilySpec, req: EstimateRequest, co: Coefficients, *, w: float, h: float, b_unet: float) -> float:
    """Quadratic attention memory (score matrices) for naive and split attention; 0 for the linear backends."""
    if req.attention not in ("none", "split"):
        return 0.0
    worst = max(heads * ((w / ds) * (h / ds)) ** 2 for ds, heads in spec.attn_levels)
    scores = b_unet * worst
    if req.attention == "none":
        per = co.naive_score_bytes if req.ui in ("a1111", "forge") else co.naive_score_elems * _elem(req.precision)
        return scores * per
    full = scores * co.split_score_elems * _elem(req.precision)
    cap = co.split_cap_mb * MIB
    # A smooth soft minimum: unsliced when small, saturating at the slicing cap; monotone, no jumps.
    return float((full**-8 + cap**-8) ** -0.125) if full > 0 else 0.0


def _vae_attention_bytes(req: EstimateRequest, w: float, h: float) -> float:
    """The VAE mid-block's single-head attention at 1/8: quadratic only for naive attention."""
    if req.attention != "none" or req.tiled_vae:
        return 0.0
    tokens = (w / 8) * (h / 8)
    return tokens * tokens * 2 * _elem(req.vae_precision)


def _unet_working(spec: FamilySpec, req: EstimateRequest, co: Coefficients, *, w: float, h: float, offload: str) -> tuple[float, float]:
    """(linear activations, attention) bytes of one UNet step at w × h, before calibration scaling."""
    batched = req.batch_cond_uncond or offload == "none" or req.ui != "a1111"
    b_unet = req.batch * (2.0 if batched else 1.0)
    latent_px = (w / 8) * (h / 8)
    act = co.unet_act[req.family] * latent_px * b_unet * _elem(req.precision)
    if req.attention == "sdp":
        act *= 1.0 + co.sdp_extra
    elif req.attention == "sub-quad":
        act *= 1.0 + co.subquad_extra
    attn = _attention_bytes(spec, req, co, w=w, h=h, b_unet=b_unet)
    return act, attn


def _vae_working(req: EstimateRequest, co: Coefficients, w: float, h: float, encode: bool) -> float:
    """Bytes of one image's VAE decode (or encode) at w × h; tiled VAE bounds the pixels it holds at once.

    A1111, Forge and SD.Next (VAE slicing) decode a batch one image at a time; ComfyUI sizes its
    decode batch to the free memory, at least one image: so one image's decode is what must fit.
    """
    px = w * h
    per_px = co.vae_decode["ldm" if req.ui == "a1111" else "silu"]
    if req.tiled_vae:
        tile = 768.0 * 768.0  # a 96-latent tile plus padding, MultiDiffusion's default on 8–12 GB cards
        work = px * 3 * 4 + min(px, tile) * per_px * _elem(req.vae_precision) * 1.25
    else:
        # The mid-block attention runs at 1/8 scale, before the full-resolution convolutions: the
        # two never coexist, so the larger of them is the decode's peak.
        work = max(px * per_px * _elem(req.vae_precision), _vae_attention_bytes(req, w, h))
    return work * (co.vae_encode_ratio if encode else 1.0)


@dataclass(frozen=True)
class PhaseTerms:
    """One phase: resident weights and working memory by kind, before calibration scaling (bytes)."""

    resident: _Resident
    unet: dict[str, float]  # scaled by Coefficients.act_scale
    vae: dict[str, float]  # scaled by Coefficients.vae_scale

    def torch_bytes(self, act_scale: float, vae_scale: float, extra: float) -> float:
        r = self.resident
        return r.unet + r.text + r.vae + act_scale * sum(self.unet.values()) + vae_scale * sum(self.vae.values()) + extra


def phase_terms(req: EstimateRequest, co: Coefficients = DEFAULT_COEFFICIENTS) -> dict[str, PhaseTerms]:
    """Every phase of the generation `req` describes (calibration reuses these to fit its scales)."""
    validate(req)
    if req.family in dit.DIT_FAMILIES:
        return _dit_phase_terms(req, co)
    spec = SPECS[req.family]
    offload = effective_offload(req.family, req.offload)
    w, h = float(req.width), float(req.height)
    hw, hh = w * req.hires_scale, h * req.hires_scale
    text_act = req.batch * 2 * _TEXT_TOKENS * spec.text_width * 24 * _elem(req.precision)
    act, attn = _unet_working(spec, req, co, w=w, h=h, offload=offload)
    unet_res = _residency(spec, req, offload, "unet")
    vae_res = _residency(spec, req, offload, "vae")
    phases = {
        "text_encode": PhaseTerms(_residency(spec, req, offload, "text"), {"activations": text_act}, {}),
        "sampling": PhaseTerms(unet_res, {"activations": act, "attention": attn}, {}),
        "vae_decode": PhaseTerms(vae_res, {}, {"vae_decode": _vae_working(req, co, w, h, False)}),
    }
    if req.hires_scale > 1.0:
        hact, hattn = _unet_working(spec, req, co, w=hw, h=hh, offload=offload)
        phases["hires_encode"] = PhaseTerms(vae_res, {}, {"hires": _vae_working(req, co, hw, hh, True)})
        phases["hires_sampling"] = PhaseTerms(unet_res, {"hires": hact + hattn}, {})
        phases["hires_decode"] = PhaseTerms(vae_res, {}, {"hires": _vae_working(req, co, hw, hh, False)})
    return phases


def _dit_residency(req: EstimateRequest, offload: str, phase: str) -> _Resident:
    """Weights of a DiT on the GPU in a phase. Forge, ComfyUI and SD.Next load a model for its phase and
    move the others out when the room is needed (A1111 keeps all three unless --medvram); --lowvram and
    its kin stream the model block by block (at least the largest block stays)."""
    elem, fam = _elem(req.precision), req.family
    model = dit.model_bytes(fam, model_format(req))
    text = dit.text_bytes(fam, t5_format(req), elem)
    vae = dit.VAE16_PARAMS * _elem(req.vae_precision)
    if req.ui == "a1111" and offload == "none":
        return _Resident(model, text, vae)
    if offload == "lowvram":
        model *= dit.largest_block_share(fam)
    return {"text": _Resident(0.0, text, 0.0), "unet": _Resident(model, 0.0, 0.0)}.get(phase, _Resident(0.0, 0.0, vae))


def _dit_working(req: EstimateRequest, co: Coefficients, w: float, h: float) -> tuple[float, float]:
    """(activations, attention) bytes of one DiT sampling step at w × h."""
    elem = _elem(req.precision)
    act = dit.activation_bytes(req.family, w, h, req.batch, elem)
    if req.attention == "sub-quad":
        act *= 1.0 + co.subquad_extra
    attn = 0.0
    if req.attention in ("none", "split"):
        full = dit.attention_score_bytes(req.family, w, h, req.batch, elem)
        cap = co.split_cap_mb * MIB
        attn = full if req.attention == "none" else float((full**-8 + cap**-8) ** -0.125)
    return act, attn


def _dit_phase_terms(req: EstimateRequest, co: Coefficients) -> dict[str, PhaseTerms]:
    """The phases of one DiT generation (dit.py): text encode, sampling, VAE decode, and the hires passes."""
    offload = "none" if req.offload == "medvram-sdxl" else req.offload
    w, h = float(req.width), float(req.height)
    hw, hh = w * req.hires_scale, h * req.hires_scale
    text_act = dit.text_activation_bytes(req.family, req.batch, _elem(req.precision))
    act, attn = _dit_working(req, co, w, h)
    model_res = _dit_residency(req, offload, "unet")
    vae_res = _dit_residency(req, offload, "vae")
    text_res = _dit_residency(req, offload, "text")
    if req.ui != "a1111":
        # Forge, ComfyUI and SD.Next load the text encoders into what is free and stream the rest once per
        # image (T5-XXL alone is 9.1 GiB in fp16): the encode needs no more room than the sampling it precedes
        # (its own activations included, so a capped encode never sets the peak above sampling).
        text_res = _Resident(0.0, min(text_res.text, max(0.0, model_res.unet + act + attn - text_act)), 0.0)
    phases = {
        "text_encode": PhaseTerms(text_res, {"activations": text_act}, {}),
        "sampling": PhaseTerms(model_res, {"activations": act, "attention": attn}, {}),
        "vae_decode": PhaseTerms(vae_res, {}, {"vae_decode": _vae_working(req, co, w, h, False)}),
    }
    if req.hires_scale > 1.0:
        hact, hattn = _dit_working(req, co, hw, hh)
        phases["hires_encode"] = PhaseTerms(vae_res, {}, {"hires": _vae_working(req, co, hw, hh, True)})
        phases["hires_sampling"] = PhaseTerms(model_res, {"hires": hact + hattn}, {})
        phases["hires_decode"] = PhaseTerms(vae_res, {}, {"hires": _vae_working(req, co, hw, hh, False)})
    return phases


def estimate(req: EstimateRequest, calibration: Calibrated | None = None) -> Estimate:
    """The peak over the phases of one generation, with its parts (MiB)."""
    co = calibration.coefficients if calibration is not None else DEFAULT_COEFFICIENTS
    phases = phase_terms(req, co)
    extra = co.extra_mb * MIB
    totals = {k: p.torch_bytes(co.act_scale, co.vae_scale, extra) for k, p in phases.items()}

    def split(p: PhaseTerms) -> tuple[float, dict[str, float], float]:
        r = p.resident
        weights = r.unet + r.text + r.vae
        work = {k: v * co.act_scale for k, v in p.unet.items()}
        for k, v in p.vae.items():
            work[k] = work.get(k, 0.0) + v * co.vae_scale
        slack = co.slack_weights * weights + co.slack_working * max(0.0, sum(work.values()) + extra)
        return weights, work, slack

    # The card must hold the largest torch + slack of any phase; max_memory_allocated() shows the
    # largest torch figure. Slack weighs working memory more than weights, so the two maxima can
    # come from different phases: the parts describe the phase that sets peak_mb.
    held = {k: totals[k] + split(p)[2] for k, p in phases.items()}
    name = max(held, key=lambda k: held[k])
    ph = phases[name]
    res = ph.resident
    weights, work, slack = split(ph)
    torch_peak = max(0.0, weights + sum(work.values()) + extra)

    raw: dict[str, float] = {
        "weights_model" if req.family in dit.DIT_FAMILIES else "weights_unet": res.unet,
        "weights_text": res.text,
        "weights_vae": res.vae,
        "activations": work.get("activations", 0.0),
        "attention": work.get("attention", 0.0),
        "vae_decode": work.get("vae_decode", 0.0),
        "hires": work.get("hires", 0.0),
        "other": extra,
        "allocator_slack": slack,
        "cuda_context": co.context_mb * MIB,
    }
    parts = {k: round(v / MIB) for k, v in raw.items()}
    phase_torch_mb = round(torch_peak / MIB)
    # Parts add up exactly: the rounding remainder of the torch parts goes to the phase's biggest term.
    torch_keys = [k for k in raw if k not in ("allocator_slack", "cuda_context")]
    diff = phase_torch_mb - sum(parts[k] for k in torch_keys)
    if diff:
        biggest = max(torch_keys, key=lambda k: raw[k])
        parts[biggest] += diff
    peak_mb = phase_torch_mb + parts["allocator_slack"] + parts["cuda_context"]
    return Estimate(
        peak_mb=peak_mb,
        torch_peak_mb=round(max(0.0, *totals.values()) / MIB),
        parts=parts,
        phase=name,
        phases={k: round(v / MIB) for k, v in totals.items()},
    )


def fits(peak_mb: int, vram_mb: int, headroom_mb: int, margin: float = DEFAULT_MARGIN) -> bool:
    """docs/architecture.md#the-policy: peak × (1 + margin) ≤ VRAM − headroom (the layout reserve never enters)."""
    return peak_mb * (1.0 + margin) <= vram_mb - headroom_mb


def max_square_px(
    req: EstimateRequest,
    vram_mb: int,
    headroom_mb: int,
    margin: float = DEFAULT_MARGIN,
    calibration: Calibrated | None = None,
) -> int | None:
    """The largest side (a multiple of 64) of a square image that fits, or None when not even 64 px does."""

    def ok(side: int) -> bool:
        e = estimate(replace(req, width=side, height=side), calibration)
        return fits(e.peak_mb, vram_mb, headroom_mb, margin)

    lo, hi = 1, 16384 // 64  # in units of 64 px; the estimate is monotone in size, so bisect
    if not ok(64):
        return None
    if ok(hi * 64):
        return hi * 64
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid * 64):
            lo = mid
        else:
            hi = mid
    return lo * 64
