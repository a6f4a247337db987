"""The diffusion transformers (Flux.1, SD3, SD3.5): their sizes, their working memory per token, and their
compute per step, for the estimate (memory.py builds the phases from these) and the format comparison.

A DiT turns the latent into tokens (2×2 patches of the 1/8 latent: (W/16)(H/16) image tokens) and runs them
with the text tokens through blocks of one width (`hidden`). Its working memory is linear in the tokens
(SDPA/xformers never hold the T² scores): elements per token at the peak of a block × tokens × the batch
the UI runs per step (SD3 batches cond and uncond; Flux.1 is guidance-distilled: one pass per step).

- Flux.1 (single-stream block, the one with the most live tensors): the block's input x (h) and its
  residual, linear1's output (3h q/k/v + 4h MLP = 7h), the RMS-normed and rotated q and k (2h), the
  attention output (h), GELU of the MLP half (4h), and the concatenation linear2 reads (5h): 19h.
- SD3/SD3.5 (joint block, per stream): x and its residual (2h), the modulated norm (h), fc1 (4h) and its
  GELU (4h): 11h; attention (qkv 3h + out h) comes before the MLP and is freed.

One scale, `DIT_ACT_FIT`, fitted on the calibration row (diffusers' Flux-dev bf16 forward at 1024², 22.64
GiB on an L40 = 22.17 GiB of weights + 0.47 GiB: 17.9h per token); the NF4 and group-offload rows of the
same benchmark are validation (reference.py). ComfyUI's own budget (supported_models.py Flux
memory_usage_factor 2.8: 917 MiB at 1024²) is the generous cross-check, same order.

Pure core.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.core.estimate.formats import WeightFormat, weights_bytes

T5XXL_PARAMS = 4_762_310_656.0  # T5 v1.1 XXL encoder (fp16 9.52 GB)
CLIP_L_PARAMS = 123_060_480.0
CLIP_G_PARAMS = 694_659_841.0
VAE16_PARAMS = 83_819_683.0  # the 16-channel AutoencoderKL of SD3 and Flux.1
DIT_ACT_FIT = 0.94
"""What the per-token count leaves out or double-counts (diffusers frees some of them earlier): fitted on the
calibration row only (see the module docstring; reference.fit_dit_constants refits it)."""


@dataclass(frozen=True)
class DitSpec:
    """Architecture facts of a DiT family (the published configs; reference/vram_data.md §8)."""

    params: float  # the diffusion transformer
    hidden: int
    blocks: int  # transformer blocks that run attention over all tokens
    heads: int
    act_per_token: float  # × hidden: live elements per token at the block's peak (module docstring)
    text_tokens: int  # the text sequence the model attends to beside the image tokens
    cfg: bool  # cond and uncond batched per step
    encoders: tuple[str, ...]  # t5xxl, clip_l, clip_g
    kept_high_params: float  # small and 1-D tensors a GGUF file keeps in 16 bit
    # The weights an image token passes through per step: the adaLN modulation runs once per image, and a
    # double/joint block's text-stream weights see only the text tokens (Flux: 19 double blocks × 113 M per
    # stream + 38 single × 113 M = 6.45 B of 11.9 B; SD3 medium 24 × 28.3 M = 0.68 B of 2.03 B).
    token_params: float


# Flux.1: 19 double + 38 single blocks, 3072 wide, 24 heads; T5 512 tokens for dev, 256 for schnell.
# kept_high_params (GGUF only): city96's converter keeps the embedders and the final layer (txt_in, time_in,
# vector_in, guidance_in, img_in, final_layer: ~64 M) and every 1-D tensor in F16/F32. Fitted on the Q4_0 file
# alone (calibration): 6.79 GB − 11.90 B × 4.5 / 8 bits = 95.5 MB, and each kept parameter costs 2 − 4.5/8 =
# 1.4375 bytes more than a quantised one: 66.4 M (reference.fit_dit_constants). bitsandbytes (Forge's and
# diffusers' NF4) and the fp8 files convert every Linear, embedders included: nothing kept worth counting.
# SD3 medium: 24 joint blocks of 1536 (depth 24 × 64), 2.03 B; SD3.5 medium (MMDiT-X) 2.47 B; SD3.5 large:
# 38 blocks of 2432, 8.06 B. Their text sequence: CLIP-L/G 77 tokens + T5 77 (ComfyUI, Forge).
SPECS: dict[str, DitSpec] = {
    "flux1-dev": DitSpec(11_901_408_320.0, 3072, 57, 24, 19.0, 512, False, ("t5xxl", "clip_l"), 66.4e6, 6.45e9),
    "flux1-schnell": DitSpec(11_901_408_320.0, 3072, 57, 24, 19.0, 256, False, ("t5xxl", "clip_l"), 66.4e6, 6.45e9),
    "sd3-medium": DitSpec(2_028_328_000.0, 1536, 24, 24, 11.0, 154, True, ("clip_l", "clip_g", "t5xxl"), 12e6,
                          0.68e9),
    "sd3.5-medium": DitSpec(2_470_000_000.0, 1536, 24, 24, 11.0, 154, True, ("clip_l", "clip_g", "t5xxl"), 14e6,
                            0.83e9),
    "sd3.5-large": DitSpec(8_056_000_000.0, 2432, 38, 38, 11.0, 154, True, ("clip_l", "clip_g", "t5xxl"), 30e6,
                           2.7e9),
}
DIT_FAMILIES = tuple(SPECS)
_ENCODER_PARAMS = {"t5xxl": T5XXL_PARAMS, "clip_l": CLIP_L_PARAMS, "clip_g": CLIP_G_PARAMS}


def image_tokens(width: float, height: float) -> float:
    return (width / 16) * (height / 16)


def step_batch(family: str, batch: int) -> int:
    """Sequences the model runs per sampling step: SD3 batches cond and uncond, Flux.1 runs one."""
    return batch * (2 if SPECS[family].cfg else 1)


def model_bytes(family: str, fmt: WeightFormat) -> float:
    """The diffusion model's weights in `fmt`; only a GGUF file keeps parameters in 16 bit (`kept_high_params`)."""
    spec = SPECS[family]
    return weights_bytes(spec.params, fmt, spec.kept_high_params if fmt.kind == "gguf" else 0.0)


def text_bytes(family: str, t5: WeightFormat | None, clip_elem: int) -> float:
    """The family's text encoders: T5 in its own format (None: not loaded, A1111's SD3 default), CLIPs in 16/32 bit."""
    total = 0.0
    for enc in SPECS[family].encoders:
        if enc == "t5xxl":
            total += weights_bytes(T5XXL_PARAMS, t5) if t5 is not None else 0.0
        else:
            total += _ENCODER_PARAMS[enc] * clip_elem
    return total


def text_activation_bytes(family: str, batch: int, elem: int) -> float:
    """T5-XXL's encode (64 heads of scores over its tokens, its 10240-wide feed-forward): small beside the weights."""
    spec = SPECS[family]
    t5_tokens = max(77, spec.text_tokens - 77) if "clip_g" in spec.encoders else spec.text_tokens
    return batch * (t5_tokens * (10240 + 4 * 4096) * elem + 64 * t5_tokens**2 * 4)


def activation_bytes(family: str, width: float, height: float, batch: int, elem: int, *,
                     fit: float = DIT_ACT_FIT) -> float:
    """Working memory of one sampling step with SDPA/xformers attention (linear in the tokens)."""
    spec = SPECS[family]
    tokens = image_tokens(width, height) + spec.text_tokens
    return fit * spec.act_per_token * spec.hidden * tokens * step_batch(family, batch) * elem


def attention_score_bytes(family: str, width: float, height: float, batch: int, elem: int) -> float:
    """Naive attention's score matrix (heads × T², two copies): what the quadratic backends would hold."""
    spec = SPECS[family]
    tokens = image_tokens(width, height) + spec.text_tokens
    return step_batch(family, batch) * spec.heads * tokens**2 * 2 * elem


# Flux.1's double block holds both streams (per stream: adaLN 3072→18432, qkv 3072→9216, proj, MLP 3072→12288→3072:
# 169.9 M), 339.8 M in all: 1.6× the mean block (11.90 B / 57). SD3's joint blocks are alike: the mean is the largest.
_LARGEST_BLOCK_PARAMS = {"flux1-dev": 339.8e6, "flux1-schnell": 339.8e6}


def largest_block_share(family: str) -> float:
    """The share of the model its largest block holds: what a UI streaming block by block keeps at least."""
    spec = SPECS[family]
    return _LARGEST_BLOCK_PARAMS.get(family, spec.params / spec.blocks) / spec.params


def flops_per_step(family: str, width: float, height: float, batch: int) -> float:
    """Multiply-adds × 2 of one sampling step: the token weights once per token, plus attention's QKᵀ and AV
    (Flux-dev at 1024²: 7.4e13)."""
    spec = SPECS[family]
    tokens = image_tokens(width, height) + spec.text_tokens
    seqs = step_batch(family, batch)
    return seqs * (2 * spec.token_params * tokens + 4 * tokens**2 * spec.hidden * spec.blocks)
