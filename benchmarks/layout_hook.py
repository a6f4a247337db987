"""What the layout costs, measured on CPU tensors through the simulated device.

1. The layout of a UNet-sized set of storages (bytes moved, seconds, MiB/s of host copies).
2. The gc scan for stray tensors in a process holding a million Python objects (A1111 holds a few
   million): `gc.get_objects()` walk + type check, against the same layout without the scan.

Run: .venv/bin/python benchmarks/layout_hook.py [--mb 512] [--runs 5] [--objects 1000000]
On a CUDA machine `--cuda` times the real TorchMover (host↔device copies) as well.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "patches")]

import torch  # noqa: E402
from lowvram_hook.layout import MIB, CachePatch, TorchMover, collect, run_layout  # noqa: E402
from torch import nn  # noqa: E402

from tests.fixtures.a1111_modules import SimDevice  # noqa: E402


def make_unet(total_mb: int, device: str = "cpu") -> nn.Module:
    """~total_mb of float16 weights in layers of mixed sizes, as a UNet has (many small, some large)."""
    layers = nn.ModuleList()
    budget = total_mb * MIB
    sizes = [64, 320, 640, 1280, 2560]
    i = 0
    while budget > 0:
        n = sizes[i % len(sizes)]
        layer = nn.Linear(n, n, dtype=torch.float16, device=device)
        layers.append(layer)
        budget -= n * n * 2 + n * 2
        i += 1
    root = nn.Module()
    root.blocks = layers
    return root


def time_layout(total_mb: int, runs: int, scan: bool) -> tuple[float, int, int]:
    times: list[float] = []
    moved = groups = 0
    unet = make_unet(total_mb)
    for _ in range(runs):
        dev = SimDevice(total_mb=total_mb * 4)
        dev.put_module(unet)
        ns = types.SimpleNamespace(empty_cache=lambda: None, ipc_collect=lambda: None)
        result = run_layout(unet, 64, dev, CachePatch(ns), scan=scan)
        assert result.ok, result.reason
        times.append(result.seconds)
        moved, groups = result.moved_bytes, result.groups
    return statistics.median(times), moved, groups


def time_scan(n_objects: int, runs: int) -> tuple[float, float, int]:
    unet = make_unet(8)
    dev = SimDevice()
    dev.put_module(unet)
    ballast = [[i] for i in range(n_objects)]  # lists stay gc-tracked (dicts of ints are untracked)
    with_scan: list[float] = []
    without: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        collect(unet, dev, scan=True)
        with_scan.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect(unet, dev, scan=False)
        without.append(time.perf_counter() - t0)
    objects = len(gc.get_objects())
    del ballast
    return statistics.median(with_scan) - statistics.median(without), statistics.median(without), objects


def time_cuda(total_mb: int, runs: int) -> None:  # pragma: no cover - needs a GPU
    unet = make_unet(total_mb, device="cuda")
    patch = CachePatch(torch.cuda)
    times = []
    for _ in range(runs):
        result = run_layout(unet, 256, TorchMover("cuda", patch), patch)
        assert result.ok, result.reason
        times.append(result.seconds)
    patch.lift()
    src = torch.empty(total_mb * MIB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize()
    pinned_h2d = total_mb / (time.perf_counter() - t0)
    bound = 2 * total_mb / pinned_h2d  # out and back at the pinned bandwidth
    med = statistics.median(times)
    print(f"cuda layout      {total_mb} MiB: {med:.3f} s (median of {runs}); copy bound {bound:.3f} s "
          f"at {pinned_h2d:.0f} MiB/s pinned; ratio {med / bound:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="UNet size in MiB (default 512)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--cuda", action="store_true", help="also time the real TorchMover on the GPU")
    args = ap.parse_args()

    med, moved, groups = time_layout(args.mb, args.runs, scan=False)
    print(f"layout (sim)     {moved / MIB:.0f} MiB in {groups} storages moved out and back: {med:.3f} s "
          f"median of {args.runs} ({2 * moved / MIB / med:.0f} MiB/s of host copies, no gc scan)")
    extra, base, objects = time_scan(args.objects, args.runs)
    print(f"gc scan          {objects:,} live objects: +{extra * 1000:.0f} ms over collecting the UNet alone "
          f"({base * 1000:.1f} ms), median of {args.runs}")
    if args.cuda and torch.cuda.is_available():
        time_cuda(args.mb, args.runs)


if __name__ == "__main__":
    main()
