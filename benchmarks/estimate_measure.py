"""Measure the working memory of randomly initialised SD1.5/SDXL UNets and the SD VAE decoder.

The models are built from their published configs (no weights are downloaded: memory does not
depend on the weights' values). On a CUDA machine the figure is `torch.cuda.max_memory_allocated()`
minus what was allocated before the call; without one, the CPU allocator's peak from the torch
profiler's memory events ("Total Allocated"), which counts the same tensors but no cuDNN/cuBLAS
workspaces. The estimator's coefficients (lowvram/core/estimate/memory.py, `Coefficients`) are checked against
these figures; the results live in lowvram/data/estimate_reference.json under "measured".

Needs `diffusers` (not a lowvram dependency): `pip install --target /tmp/mdeps diffusers` and run
with `PYTHONPATH=/tmp/mdeps python benchmarks/estimate_measure.py [--quick] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "layers_per_block": 2,
}
VAE: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
}


def _peak_working_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during fn() above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    if not totals:
        return 0
    # The first event's total includes that event's own allocation.
    first = next(e for e in events if e.get("name") == "[memory]")
    base = totals[0] - first["args"].get("Bytes", 0)
    return int(max(totals) - base)


def _set_attention(model: torch.nn.Module, naive: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model.set_attn_processor(AttnProcessor() if naive else AttnProcessor2_0())  # type: ignore[operator]


def measure(quick: bool, device: str, dtype_name: str) -> list[dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    torch.set_grad_enabled(False)
    rows: list[dict[str, Any]] = []

    def record(**row: Any) -> None:
        row.update(device=device, dtype=dtype_name)
        rows.append(row)
        print(json.dumps(row), flush=True)

    vae = AutoencoderKL(**VAE).to(device=device, dtype=dtype).eval()
    for side in (256, 512) if quick else (256, 512, 768):
        z = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype)
        for naive in (False, True):
            _set_attention(vae, naive)
            t = time.perf_counter()
            work = _peak_working_bytes(lambda z=z, m=vae: m.decode(z), device)
            record(part="vae_decode", family="sd", width=side, height=side, batch=1, naive=naive,
                   working_mb=round(work / 2**20, 1), seconds=round(time.perf_counter() - t, 1))
    del vae

    plans = {
        "sd15": (SD15_UNET, 768, (256, 512) if quick else (256, 512, 640)),
        "sdxl": (SDXL_UNET, 2048, (512,) if quick else (512, 768)),
    }
    for family, (config, ctx_dim, sides) in plans.items():
        unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
        params = sum(p.numel() for p in unet.parameters())
        for side in sides:
            for b_unet in (1, 2) if quick else (1, 2, 4):
                for naive in (False, True):
                    if naive and (b_unet > 2 or (family == "sdxl" and side > 512)):
                        continue
                    _set_attention(unet, naive)
                    x = torch.randn(b_unet, 4, side // 8, side // 8, device=device, dtype=dtype)
                    ctx = torch.randn(b_unet, 77, ctx_dim, device=device, dtype=dtype)
                    extra: dict[str, Any] = {}
                    if family == "sdxl":
                        extra["added_cond_kwargs"] = {
                            "text_embeds": torch.randn(b_unet, 1280, device=device, dtype=dtype),
                            "time_ids": torch.randn(b_unet, 6, device=device, dtype=dtype),
                        }
                    t = time.perf_counter()
                    work = _peak_working_bytes(
                        lambda x=x, ctx=ctx, extra=extra, m=unet: m(x, 500, encoder_hidden_states=ctx, **extra), device
                    )
                    record(part="unet", family=family, params=params, width=side, height=side, batch=b_unet,
                           naive=naive, working_mb=round(work / 2**20, 1), seconds=round(time.perf_counter() - t, 1))
        del unet
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a few minutes on 2 CPU cores)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--out", help="write the rows as JSON to this file")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = measure(args.quick, device, args.dtype)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
