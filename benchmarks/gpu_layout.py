"""The layout hook and the estimator on a real CUDA GPU (issue 13 §4). Needs an NVIDIA GPU.

layout: random-init fp16 parameter trees of SD1.5 and SDXL UNet size (the real tensor count and
  size mix: 686 / 1680 tensors, 859.5 M / 2567.5 M parameters), with stand-ins for the VAE and the
  text encoders (found by the hook's gc scan) and a few fp32 schedule tensors that are views of one
  another, put on the GPU as a fake A1111 model (`model.model.diffusion_model`). The real
  `run_layout` (patches/lowvram_hook/layout.py) with the real `TorchMover` and
  `CachePatch(torch.cuda)`, under a capped budget (`torch.cuda.set_per_process_memory_fraction`,
  so the card behaves like a 6 GB / 8 GB one), for each reserve, several runs. Prints the layout's
  median seconds against the pinned host<->device copy bound of the same bytes measured in the same
  process (one pinned buffer, D2H + H2D), as a ratio; checks that every tensor came back
  bit-identical (sum and sum of squares of its raw bits), on the GPU, with the same
  shape/stride/offset and the same storage sharing; and that the reserve stayed in PyTorch's cache.

peaks: the real UNet and VAE classes from A1111's repositories (ldm = Stability-AI/stablediffusion
  for SD1.5, sgm = Stability-AI/generative-models for SDXL), built from the configs A1111 uses
  (configs/v1-inference.yaml, sgm's configs/inference/sd_xl_base.yaml), random init, fp16; a
  stand-in for the text encoders (a tensor of their parameter count; not run). Attention: torch's
  `scaled_dot_product_attention` in place of CrossAttention/AttnBlock forward, as A1111
  `--opt-sdp-attention` does (the backend is torch's choice; the flags are printed). One UNet
  forward per step at batch 2 (cond + uncond, as CFG does) under `torch.no_grad()` + fp16 autocast,
  then one image's VAE decode without autocast (as A1111 1.8 does); `max_memory_allocated/
  reserved` after `reset_peak_memory_stats`, against `lowvram estimate --json` for the same
  settings (run as a subprocess). Without the ldm/sgm code this part is skipped with one line.

Needs: torch with CUDA; for peaks also einops, numpy, pillow, pyyaml (+ fsspec, safetensors,
packaging for sgm); omegaconf is replaced by a stub when missing. lowvram's estimate runs from this
checkout (`python -m lowvram`, needs typer, pyyaml, psutil).

  python benchmarks/gpu_layout.py --webui /path/to/stable-diffusion-webui [--json out.json]
  python benchmarks/gpu_layout.py --stage .gpu-bench --webui ...   # copy ldm/sgm + configs to carry
  python benchmarks/gpu_layout.py --dry-run --webui ...            # CPU: simulated device, tiny forward
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO / "patches"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from lowvram_hook.layout import MIB, CachePatch, LayoutResult, TorchMover, run_layout  # noqa: E402
from torch import nn  # noqa: E402

FAMILIES = ("sd15", "sdxl")
SIZES = {"sd15": 512, "sdxl": 1024}  # the image size each family's peaks are measured at
DEFAULT_CAPS = {"sd15": 6144, "sdxl": 8192}  # MiB: a 6 GB card for SD1.5, an 8 GB card for SDXL
EXPECTED_PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}  # ldm/sgm UNetModel, counted on meta
Shape = tuple[int, ...]

# --- UNet-size parameter trees (the layout part needs the tensors, not the architecture) -------

UNET_SPECS: dict[str, dict[str, Any]] = {
    "sd15": {"mult": (1, 2, 4, 4), "attn": (1, 1, 1, 0), "depth": (1, 1, 1, 0), "mid": 1, "ctx": 768,
             "linear": False, "adm": 0, "text": ((768, 12, False),)},
    "sdxl": {"mult": (1, 2, 4), "attn": (0, 1, 1), "depth": (0, 2, 10), "mid": 10, "ctx": 2048,
             "linear": True, "adm": 2816, "text": ((768, 12, False), (1280, 32, True))},
}


def _res(cin: int, cout: int, emb: int = 1280) -> list[Shape]:
    """A ResBlock: GroupNorm, conv 3x3, time-embedding linear, GroupNorm, conv 3x3, 1x1 skip."""
    s: list[Shape] = [(cin,), (cin,), (cout, cin, 3, 3), (cout,)]
    if emb:
        s += [(cout, emb), (cout,)]
    s += [(cout,), (cout,), (cout, cout, 3, 3), (cout,)]
    if cin != cout:
        s += [(cout, cin, 1, 1), (cout,)]
    return s


def _transformer(c: int, depth: int, ctx: int, linear: bool) -> list[Shape]:
    """A SpatialTransformer: norm, proj_in, `depth` blocks (self-, cross-attention, GEGLU), proj_out."""
    proj: Shape = (c, c) if linear else (c, c, 1, 1)
    s: list[Shape] = [(c,), (c,), proj, (c,)]
    for _ in range(depth):
        s += [(c, c), (c, c), (c, c), (c, c), (c,)]  # self-attention q, k, v, out
        s += [(c, c), (c, ctx), (c, ctx), (c, c), (c,)]  # cross-attention
        s += [(8 * c, c), (8 * c,), (c, 4 * c), (c,)]  # GEGLU feed-forward
        s += [(c,), (c,)] * 3  # three LayerNorms
    return [*s, proj, (c,)]


def unet_shapes(family: str) -> list[list[Shape]]:
    """Parameter shapes of the ldm/sgm UNetModel of `family`, one list per block."""
    sp, mc = UNET_SPECS[family], 320
    emb = 4 * mc
    stem: list[Shape] = [(emb, mc), (emb,), (emb, emb), (emb,)]
    if sp["adm"]:
        stem += [(emb, sp["adm"]), (emb,), (emb, emb), (emb,)]
    blocks = [[*stem, (mc, 4, 3, 3), (mc,)]]
    chans, ch, levels = [mc], mc, len(sp["mult"])

    def attn(level: int, c: int) -> list[Shape]:
        return _transformer(c, sp["depth"][level], sp["ctx"], sp["linear"]) if sp["attn"][level] else []

    for level, mult in enumerate(sp["mult"]):
        for _ in range(2):
            blocks.append(_res(ch, mult * mc) + attn(level, mult * mc))
            ch = mult * mc
            chans.append(ch)
        if level < levels - 1:
            blocks.append([(ch, ch, 3, 3), (ch,)])
            chans.append(ch)
    blocks.append(_res(ch, ch) + _transformer(ch, sp["mid"], sp["ctx"], sp["linear"]) + _res(ch, ch))
    for level in reversed(range(levels)):
        mult = sp["mult"][level]
        for i in range(3):
            block = _res(ch + chans.pop(), mult * mc) + attn(level, mult * mc)
            ch = mult * mc
            if level and i == 2:
                block += [(ch, ch, 3, 3), (ch,)]
            blocks.append(block)
    blocks.append([(mc,), (mc,), (4, mc, 3, 3), (4,)])
    return blocks


def vae_shapes() -> list[list[Shape]]:
    """The SD/SDXL AutoencoderKL (ch 128, mult 1,2,4,4, z 4): encoder, quant convs, decoder."""
    def mid(c: int) -> list[Shape]:
        return _res(c, c, 0) + [(c,), (c,)] + [(c, c, 1, 1), (c,)] * 4 + _res(c, c, 0)

    enc: list[Shape] = [(128, 3, 3, 3), (128,)]
    ch = 128
    for level, mult in enumerate((1, 2, 4, 4)):
        for _ in range(2):
            enc += _res(ch, 128 * mult, 0)
            ch = 128 * mult
        if level < 3:
            enc += [(ch, ch, 3, 3), (ch,)]
    enc += [*mid(ch), (ch,), (ch,), (8, ch, 3, 3), (8,), (8, 8, 1, 1), (8,)]
    dec: list[Shape] = [(4, 4, 1, 1), (4,), (512, 4, 3, 3), (512,), *mid(512)]
    ch = 512
    for level, mult in reversed(list(enumerate((1, 2, 4, 4)))):
        for _ in range(3):
            dec += _res(ch, 128 * mult, 0)
            ch = 128 * mult
        if level:
            dec += [(ch, ch, 3, 3), (ch,)]
    return [enc, [*dec, (ch,), (ch,), (3, ch, 3, 3), (3,)]]


def text_shapes(family: str) -> list[list[Shape]]:
    """CLIP text transformers (CLIP-L; + OpenCLIP bigG for SDXL): embeddings, layers, final norm."""
    blocks = []
    for width, layers, proj in UNET_SPECS[family]["text"]:
        w = width
        layer: list[Shape] = [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,),
                              (4 * w, w), (4 * w,), (w, 4 * w), (w,)]
        blocks.append([(49408, w), (77, w)] + layer * layers + [(w,), (w,)] + ([(w, w)] if proj else []))
    return blocks


def count_params(blocks: Iterable[Iterable[Shape]]) -> tuple[int, int]:
    """(parameters, tensors) of a list of shape lists."""
    n = t = 0
    for block in blocks:
        for shape in block:
            size = 1
            for d in shape:
                size *= d
            n, t = n + size, t + 1
    return n, t


class ShapeTree(nn.Module):
    """A module tree holding one ParameterList per block: tensors only, no forward."""

    def __init__(self, blocks: Sequence[Sequence[Shape]], device: Any, dtype: torch.dtype, scale: float = 1.0):
        super().__init__()
        self.blocks = nn.ModuleList()
        for shapes in blocks:
            holder = nn.Module()
            holder.params = nn.ParameterList(
                nn.Parameter(torch.empty(_scaled(s, scale), device=device, dtype=dtype), requires_grad=False)
                for s in shapes)
            self.blocks.append(holder)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()


def _scaled(shape: Shape, scale: float) -> Shape:
    if scale >= 1.0:
        return shape
    return (max(1, round(shape[0] * scale)), *shape[1:])


def build_fake_model(family: str, device: Any, *, scale: float = 1.0, dtype: torch.dtype = torch.float16) -> Any:
    """A fake A1111 model: the UNet at model.model.diffusion_model, VAE/text stand-ins, schedule views."""
    torch.manual_seed(1234)
    unet = ShapeTree(unet_shapes(family), device, dtype, scale)
    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet), lowvram=False,
                                  is_sdxl=family == "sdxl", first_stage_model=ShapeTree(vae_shapes(), device, dtype, scale),
                                  cond_stage_model=ShapeTree(text_shapes(family), device, dtype, scale))
    # A1111 keeps fp32 schedule tensors on the model; two of these are views of the first one.
    model.alphas_cumprod = torch.linspace(0.9991, 0.0047, 1000, device=device)
    model.alphas_cumprod_prev = model.alphas_cumprod[:-1]
    model.alphas_cumprod_tail = model.alphas_cumprod[500:]
    return model


def model_tensors(model: Any) -> list[Any]:
    out = list(model.model.diffusion_model.parameters()) + list(model.first_stage_model.parameters())
    out += list(model.cond_stage_model.parameters())
    return [*out, model.alphas_cumprod, model.alphas_cumprod_prev, model.alphas_cumprod_tail]


def checksums(tensors: Sequence[Any], chunk: int = 1 << 22) -> Any:
    """Per tensor: sum and sum of squares of its raw bits (int64, wrapping), on the CPU. In chunks,
    so the temporaries stay small under the capped budget (SDXL's largest tensor is 63 M elements)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}
    rows = []
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().contiguous().reshape(-1).view(bits[t.element_size()])
            acc = torch.zeros(2, dtype=torch.int64, device=flat.device)
            for i in range(0, flat.numel(), chunk):
                x = flat[i : i + chunk].to(torch.int64)
                acc += torch.stack([x.sum(), (x * x).sum()])
                del x
            rows.append(acc)
    return torch.stack(rows).cpu()


def signature(tensors: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Device type, shape, stride, offset and which earlier tensor shares the storage, per tensor."""
    first: dict[int, int] = {}
    out = []
    for i, t in enumerate(tensors):
        ptr = t.untyped_storage().data_ptr()
        owner = first.setdefault(ptr, i)
        out.append((t.device.type, tuple(t.shape), tuple(t.stride()), t.storage_offset(), owner))
    return out


# --- the device: a real CUDA card, or (--dry-run) the test suite's simulated one ---------------


class CudaBackend:
    """The real card; `cap_mb` makes PyTorch's allocator refuse more than that (0: no cap)."""

    name = "cuda"

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.total = int(torch.cuda.get_device_properties(self.device).total_memory)

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        sdp = {k: bool(getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: False)())
               for k in ("flash", "mem_efficient", "math", "cudnn")}
        return {"device": props.name, "total_mib": self.total // MIB, "torch": torch.__version__,
                "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}", "sdp_backends": sdp}

    def new_mover(self) -> tuple[Any, CachePatch]:
        patch = CachePatch(torch.cuda)
        return TorchMover(self.device, patch), patch

    def put(self, tensors: Sequence[Any]) -> None:
        pass

    def cap(self, mb: int) -> None:
        frac = 1.0 if mb <= 0 else min(1.0, mb * MIB / self.total)
        torch.cuda.set_per_process_memory_fraction(frac, self.device)

    def cached_free(self, mover: Any) -> int:
        torch.cuda.empty_cache()  # the patched no-op while a reserve is held: must not release it
        return int(torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def copy_bound(self, nbytes: int, reps: int) -> dict[str, float]:
        """Seconds to copy `nbytes` D2H then H2D through one pinned buffer (median of reps), and
        through pageable memory as the layout does (`.cpu()` into a fresh buffer, `.to(device)`)."""
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dev.fill_(7)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        d2h, h2d, pageable = [], [], []
        for _ in range(max(1, reps)):
            self.sync()
            t0 = time.perf_counter()
            host.copy_(dev, non_blocking=True)
            self.sync()
            t1 = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            self.sync()
            d2h.append(t1 - t0)
            h2d.append(time.perf_counter() - t1)
        del host
        for _ in range(max(1, min(reps, 2))):
            t0 = time.perf_counter()
            paged = dev.cpu()
            back = paged.to(self.device)
            self.sync()
            pageable.append(time.perf_counter() - t0)
            del paged, back
        del dev
        self.release()
        return {"d2h_s": statistics.median(d2h), "h2d_s": statistics.median(h2d),
                "pinned_s": statistics.median(d2h) + statistics.median(h2d), "pageable_s": statistics.median(pageable)}


class SimBackend:
    """--dry-run: CPU tensors on the test suite's simulated device (tests/fixtures/a1111_modules.py)."""

    name = "sim"

    def __init__(self) -> None:
        from tests.fixtures.a1111_modules import SimDevice

        self.dev = SimDevice(total_mb=1 << 20)
        self.device = torch.device("cpu")
        self.total = self.dev.total_mb * MIB

    def describe(self) -> dict[str, Any]:
        return {"device": "simulated (CPU storages; --dry-run)", "total_mib": self.total // MIB,
                "torch": torch.__version__, "cuda": None, "capability": None, "sdp_backends": {}}

    def new_mover(self) -> tuple[Any, CachePatch]:
        ns = types.SimpleNamespace(empty_cache=lambda: None, ipc_collect=lambda: None)
        return self.dev, CachePatch(ns)

    def put(self, tensors: Sequence[Any]) -> None:
        self.dev.put(*tensors)

    def cap(self, mb: int) -> None:
        pass

    def cached_free(self, mover: Any) -> int:
        return int(mover.cached_free)

    def sync(self) -> None:
        pass

    def release(self) -> None:
        gc.collect()

    def copy_bound(self, nbytes: int, reps: int) -> dict[str, float]:
        src = torch.ones(nbytes, dtype=torch.uint8)
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            dst = src.clone()
            src.copy_(dst)
            times.append(time.perf_counter() - t0)
            del dst
        med = statistics.median(times)
        return {"d2h_s": med / 2, "h2d_s": med / 2, "pinned_s": med, "pageable_s": med}


# --- the layout ----------------------------------------------------------------------------------


def _one_layout(unet: Any, reserve: int, backend: Any, *, mover: Any, patch: CachePatch,
                tensors: Sequence[Any], before: Any, sig: Any) -> dict[str, Any]:
    result: LayoutResult = run_layout(unet, reserve, mover, patch)
    backend.sync()
    kept = backend.cached_free(mover) if result.ok and reserve else None
    same = bool(torch.equal(checksums(tensors), before)) and signature(tensors) == sig
    return {"ok": result.ok, "reason": result.reason, "seconds": result.seconds, "moved_bytes": result.moved_bytes,
            "groups": result.groups, "unet_groups": result.unet_groups, "skipped": result.skipped,
            "free_mb": result.free_mb, "patched": result.patched, "identical": same,
            "cache_kept": None if kept is None else kept >= reserve * MIB, "cached_free_mb": None if kept is None else kept // MIB}


def layout_family(family: str, args: argparse.Namespace, backend: Any) -> dict[str, Any]:
    """Every reserve × runs layouts of one family's fake model under the family's cap, and the bound."""
    cap = args.cap_mb.get(family, 0)
    backend.cap(cap)
    model = build_fake_model(family, backend.device, scale=args.scale)
    tensors = model_tensors(model)
    backend.put(tensors)
    backend.sync()
    before, sig = checksums(tensors), signature(tensors)
    mover, patch = backend.new_mover()
    rows = []
    try:
        for reserve in args.reserves:
            runs = [_one_layout(model.model.diffusion_model, reserve, backend, mover=mover, patch=patch,
                                tensors=tensors, before=before, sig=sig)
                    for _ in range(args.runs)]
            secs = [r["seconds"] for r in runs if r["ok"]]
            rows.append({"reserve_mb": reserve, "runs": runs, "ok": all(r["ok"] for r in runs),
                         "median_s": statistics.median(secs) if secs else None, "min_s": min(secs) if secs else None,
                         "identical": all(r["identical"] for r in runs),
                         "cache_kept": None if not reserve else all(bool(r["cache_kept"]) for r in runs),
                         "reasons": sorted({r["reason"] for r in runs if not r["ok"]})})
    finally:
        patch.lift()
        del tensors, model
        backend.release()
        backend.cap(0)
    moved = max((r["moved_bytes"] for row in rows for r in row["runs"]), default=0)
    groups = max((r["groups"] for row in rows for r in row["runs"]), default=0)
    bound = backend.copy_bound(moved, args.bound_reps) if moved else None
    for row in rows:
        row["ratio"] = row["median_s"] / bound["pinned_s"] if bound and row["median_s"] else None
    return {"family": family, "cap_mb": cap, "moved_mib": moved / MIB, "storages": groups, "bound": bound, "rows": rows}


# --- peaks: the real ldm/sgm classes -------------------------------------------------------------


def resolve_paths(args: argparse.Namespace) -> dict[str, Path | None]:
    """ldm/sgm roots and the two configs, from --webui (an A1111 tree) unless given one by one."""
    web = Path(args.webui) if args.webui else None
    repos = web / "repositories" if web else None

    def pick(given: str | None, default: Path | None) -> Path | None:
        path = Path(given) if given else default
        return path if path is not None and path.exists() else None

    return {"ldm": pick(args.ldm_path, repos / "stable-diffusion-stability-ai" if repos else None),
            "sgm": pick(args.sgm_path, repos / "generative-models" if repos else None),
            "sd15_config": pick(args.sd15_config, web / "configs" / "v1-inference.yaml" if web else None),
            "sdxl_config": pick(args.sdxl_config, repos / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml"
                                if repos else None)}


def stage(dest: Path, paths: dict[str, Path | None]) -> list[str]:
    """Copy the ldm/sgm sources (.py) and the two configs into `dest`, laid out as an A1111 tree, so
    a device machine that gets only this checkout can run `--webui dest`. Returns what was copied."""
    done = []
    for key, sub, pkg in (("ldm", "stable-diffusion-stability-ai", "ldm"), ("sgm", "generative-models", "sgm")):
        root = paths[key]
        if root is None:
            continue
        target = dest / "repositories" / sub / pkg
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / pkg, target, ignore=lambda d, names: [n for n in names if not (
            n.endswith(".py") or (Path(d) / n).is_dir()) or n == "__pycache__"])
        done.append(str(target))
    for key, rel in (("sd15_config", "configs/v1-inference.yaml"),
                     ("sdxl_config", "repositories/generative-models/configs/inference/sd_xl_base.yaml")):
        src = paths[key]
        if src is not None:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            done.append(str(dest / rel))
    return done


def _stub_packages(paths: dict[str, Path | None]) -> list[str]:
    """omegaconf (only ListConfig is used by the UNet constructors) when missing; sgm's package
    __init__ files import the training stack (lightning, open_clip): bypass them."""
    notes = []
    try:
        import omegaconf.listconfig  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        root, sub = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.listconfig")
        root.ListConfig = sub.ListConfig = type("ListConfig", (list,), {})  # type: ignore[attr-defined]
        root.listconfig = sub  # type: ignore[attr-defined]
        sys.modules.setdefault("omegaconf", root)
        sys.modules.setdefault("omegaconf.listconfig", sub)
        notes.append("omegaconf missing: stubbed (ListConfig only)")
    if paths["sgm"] is not None and "sgm" not in sys.modules:
        for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(paths["sgm"] / name.replace(".", "/"))]
            sys.modules[name] = pkg
    for key in ("ldm", "sgm"):
        if paths[key] is not None and str(paths[key]) not in sys.path:
            sys.path.insert(0, str(paths[key]))
    return notes


def sdp_cross_attention_forward(self: Any, x: Any, context: Any = None, mask: Any = None, **_kw: Any) -> Any:
    """CrossAttention through torch SDP, as A1111's --opt-sdp-attention (no mask, no hypernetworks)."""
    b, h = x.shape[0], self.heads
    q = self.to_q(x)
    ctx = x if context is None else context
    k, v = self.to_k(ctx), self.to_v(ctx)
    d = q.shape[-1] // h
    q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, h * d).to(q.dtype)
    return self.to_out[1](self.to_out[0](out))


def sdp_attnblock_forward(self: Any, x: Any) -> Any:
    """The VAE's single-head AttnBlock through torch SDP, as A1111's --opt-sdp-attention."""
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, hh, ww = q.shape
    q, k, v = (t.flatten(2).transpose(1, 2).contiguous() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, c, hh, ww)
    return x + self.proj_out(out)


def load_code(family: str, paths: dict[str, Path | None]) -> tuple[Any, Any, Any, list[str]]:
    """(UNetModel, Encoder, Decoder, notes) of ldm (sd15) or sgm (sdxl), SDP patched in. Raises
    ImportError/FileNotFoundError with a one-line reason."""
    pkg = "ldm" if family == "sd15" else "sgm"
    root = paths[pkg]
    if root is None or not (root / pkg).is_dir():
        raise FileNotFoundError(f"no {pkg} code (give --webui or --{pkg}-path)")
    if paths[f"{family}_config"] is None:
        raise FileNotFoundError(f"no {family} config (give --webui or --{family}-config)")
    notes = _stub_packages(paths)
    import importlib

    with contextlib.redirect_stdout(io.StringIO()):  # "No module 'xformers'" and the like
        unet_mod = importlib.import_module(f"{pkg}.modules.diffusionmodules.openaimodel")
        vae_mod = importlib.import_module(f"{pkg}.modules.diffusionmodules.model")
        attn_mod = importlib.import_module(f"{pkg}.modules.attention")
    attn_mod.CrossAttention.forward = sdp_cross_attention_forward
    vae_mod.AttnBlock.forward = sdp_attnblock_forward
    return unet_mod.UNetModel, vae_mod.Encoder, vae_mod.Decoder, notes


def read_configs(family: str, path: Path, tiny: bool) -> tuple[dict[str, Any], dict[str, Any], float, int]:
    """(UNet params, VAE ddconfig, scale_factor, context dim) from the config A1111 uses."""
    import yaml

    params = yaml.safe_load(path.read_text())["model"]["params"]
    unet = dict(params["unet_config" if family == "sd15" else "network_config"]["params"])
    dd = dict(params["first_stage_config"]["params"]["ddconfig"])
    dd["attn_type"] = "vanilla"  # A1111 without xformers (repair_config); its forward is patched to SDP
    if tiny:  # --dry-run on the CPU: the same classes and code paths at a fraction of the width
        unet["model_channels"] = 32
        unet.update({"num_heads": 4} if family == "sd15" else {"num_head_channels": 8})
        dd["ch"] = 32
    return unet, dd, float(params["scale_factor"]), int(unet["context_dim"])


class Autoencoder(nn.Module):
    """AutoencoderKL's modules (encoder, decoder, quant convs) without its Lightning wrapper."""

    def __init__(self, enc_cls: Any, dec_cls: Any, dd: dict[str, Any], embed_dim: int = 4) -> None:
        super().__init__()
        self.encoder, self.decoder = enc_cls(**dd), dec_cls(**dd)
        self.quant_conv = nn.Conv2d(2 * dd["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)

    def decode(self, z: Any) -> Any:
        return self.decoder(self.post_quant_conv(z))


def build_real(family: str, paths: dict[str, Path | None], device: Any, *, dtype: torch.dtype,
               vae_dtype: torch.dtype, tiny: bool = False) -> dict[str, Any]:
    """The real UNet and VAE, built on the meta device (no host memory), then random-initialised in
    place on `device`: fan-in-scaled normal weights, ones/zeros for 1-d tensors."""
    unet_cls, enc_cls, dec_cls, notes = load_code(family, paths)
    unet_p, dd, scale_factor, ctx = read_configs(family, paths[f"{family}_config"], tiny)  # type: ignore[arg-type]
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        unet, vae = unet_cls(**unet_p), Autoencoder(enc_cls, dec_cls, dd)
    counts = {"unet_params": sum(p.numel() for p in unet.parameters()),
              "vae_params": sum(p.numel() for p in vae.parameters())}
    counts["full_unet_params"] = counts["unet_params"]
    if tiny:  # the full-size UNet too, on meta only: its parameter count is what the estimator assumes
        full_p = read_configs(family, paths[f"{family}_config"], False)[0]  # type: ignore[arg-type]
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            counts["full_unet_params"] = sum(p.numel() for p in unet_cls(**full_p).parameters())
    unet = unet.to(dtype).to_empty(device=device).eval()
    vae = vae.to(vae_dtype).to_empty(device=device).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for module in (unet, vae):
            for name, p in module.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, (p[0].numel()) ** -0.5)
                else:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
    return {"unet": unet, "vae": vae, "scale_factor": scale_factor, "context_dim": ctx,
            "adm": int(unet_p.get("adm_in_channels") or 0), "notes": notes, **counts}


TEXT_PARAMS = {f: count_params(text_shapes(f))[0] for f in FAMILIES}  # CLIP-L 123.06 M; + bigG for SDXL


def _phase(fn: Any, backend: Any) -> dict[str, int | None]:
    """Run fn(); peak allocated/reserved during it (CUDA only)."""
    cuda = backend.name == "cuda"
    if cuda:
        backend.sync()
        torch.cuda.reset_peak_memory_stats(backend.device)
    t0 = time.perf_counter()
    fn()
    backend.sync()
    out: dict[str, int | None] = {"seconds_ms": int((time.perf_counter() - t0) * 1000), "alloc": None, "reserved": None}
    if cuda:
        out["alloc"] = int(torch.cuda.max_memory_allocated(backend.device))
        out["reserved"] = int(torch.cuda.max_memory_reserved(backend.device))
    return out


def _inputs(built: dict[str, Any], device: Any, side: int, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """A CFG step's UNet inputs (batch 2: cond + uncond) and one image's latent, seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    kw: dict[str, Any] = {"context": torch.randn(2, 77, built["context_dim"], generator=gen, device=device, dtype=dtype)}
    if built["adm"]:
        kw["y"] = torch.randn(2, built["adm"], generator=gen, device=device, dtype=dtype)
    return {"x": torch.randn(2, 4, side, side, generator=gen, device=device),
            "t": torch.tensor([999.0, 999.0], device=device), "kw": kw,
            "z": torch.randn(1, 4, side, side, generator=gen, device=device, dtype=vae_dtype) / built["scale_factor"]}


def measure_family(family: str, args: argparse.Namespace, backend: Any, paths: dict[str, Path | None]) -> dict[str, Any]:
    """Resident weights, then `--steps` batch-2 UNet forwards, then one image's VAE decode."""
    cuda = backend.name == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    vae_dtype = torch.float16 if cuda and args.vae_precision == "half" else torch.float32
    built = build_real(family, paths, backend.device, dtype=dtype, vae_dtype=vae_dtype, tiny=not cuda)
    side = (SIZES[family] if cuda else 64) // 8
    live = {"unet": built.pop("unet"), "vae": built.pop("vae"),
            "text": torch.empty(TEXT_PARAMS[family] * 2 if cuda else 1, dtype=torch.uint8, device=backend.device)}
    backend.release()
    resident = int(torch.cuda.memory_allocated(backend.device)) if cuda else None
    live.update(_inputs(built, backend.device, side, dtype, vae_dtype))
    shapes: dict[str, Any] = {}

    def sample() -> None:
        with torch.no_grad(), torch.autocast(backend.device.type, dtype=torch.float16, enabled=cuda):
            for _ in range(max(1, args.steps)):
                out = live["unet"](live["x"], live["t"], **live["kw"])
                shapes["unet_out"] = tuple(out.shape)
                del out

    def decode() -> None:  # A1111 1.8 decodes outside autocast, in the VAE's own dtype
        with torch.no_grad():
            img = live["vae"].decode(live["z"])
            shapes["image"] = tuple(img.shape)
            del img

    sampling, decoding = _phase(sample, backend), _phase(decode, backend)
    non_torch = None
    if cuda:
        free, total = torch.cuda.mem_get_info(backend.device)
        non_torch = int(total - free - torch.cuda.memory_reserved(backend.device))
    live.clear()
    backend.release()
    return {"family": family, "size": side * 8, "resident": resident, "sampling": sampling,
            "vae_decode": decoding, "non_torch": non_torch, "shapes": shapes, **built}


def run_estimate(family: str, args: argparse.Namespace, vram_mb: int) -> dict[str, Any]:
    """`lowvram estimate --json` for the measured settings, in a clean LOWVRAM_HOME (no calibration)."""
    cmd = (args.lowvram.split() if args.lowvram else [sys.executable, "-m", "lowvram"]) + [
        "estimate", "--model", family, "--width", str(SIZES[family]), "--height", str(SIZES[family]),
        "--batch", "1", "--precision", "half", "--vae-precision", args.vae_precision, "--ui", "a1111",
        "--attention", "sdp", "--offload", "none", "--vram-mb", str(vram_mb), "--json"]
    with tempfile.TemporaryDirectory(prefix="lowvram-bench-") as home:
        env = dict(os.environ, LOWVRAM_HOME=home, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env.pop("LOWVRAM_FACTS", None)
        env.pop("LOWVRAM_WEBUI", None)
        proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"lowvram estimate exited {proc.returncode}: {last}")
    return dict(json.loads(proc.stdout))


def compare_rows(m: dict[str, Any], est: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Measured against estimated MiB, by what each side counts (None where not measured)."""
    def mib(v: int | None) -> float | None:
        return None if v is None else v / MIB

    parts = est["parts"] if est else {}
    phases = est["phases"] if est else {}
    weights = sum(parts.get(k, 0) for k in ("weights_unet", "weights_text", "weights_vae")) if est else None
    res, s, d = m["resident"], m["sampling"], m["vae_decode"]
    card = None if s["reserved"] is None or m["non_torch"] is None else max(s["reserved"], d["reserved"]) + m["non_torch"]
    rows = [
        ("weights resident (UNet + VAE + text stand-in)", mib(res), weights),
        ("sampling: peak allocated", mib(s["alloc"]), phases.get("sampling")),
        ("sampling: working (peak - resident)", mib(None if res is None else s["alloc"] - res),
         None if weights is None else phases["sampling"] - weights),
        ("VAE decode: peak allocated", mib(d["alloc"]), phases.get("vae_decode")),
        ("VAE decode: working (peak - resident)", mib(None if res is None else d["alloc"] - res), parts.get("vae_decode")),
        ("torch peak allocated", mib(None if res is None else max(s["alloc"], d["alloc"])), est["torch_peak_mb"] if est else None),
        ("card peak (max reserved + non-torch)", mib(card), est["peak_mb"] if est else None),
        ("non-torch (CUDA context, libraries)", mib(m["non_torch"]), parts.get("cuda_context")),
    ]
    out = []
    for what, measured, estimated in rows:
        err = None
        if measured and estimated is not None:
            err = 100.0 * (estimated - measured) / measured
        out.append({"what": what, "measured_mib": measured, "estimate_mib": estimated, "error_pct": err})
    return out


# --- output -------------------------------------------------------------------------------------


def fmt(v: Any, spec: str = ".0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """The first `left` columns left-aligned, the others right-aligned; non-strings go through fmt()."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def layout_table(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for fam in results:
        b = fam["bound"] or {}
        for row in fam["rows"]:
            rows.append([fam["family"], fam["cap_mb"] or "none", row["reserve_mb"], fam["moved_mib"], fam["storages"],
                         "NO: " + "; ".join(row["reasons"]) if not row["ok"] else fmt(row["median_s"], ".3f"),
                         fmt(row["min_s"], ".3f"), fmt(b.get("pinned_s"), ".3f"), fmt(b.get("pageable_s"), ".3f"),
                         fmt(row["ratio"], ".1f") + ("x" if row["ratio"] else ""), row["identical"], row["cache_kept"]])
    return format_table(["family", "cap MiB", "reserve MiB", "moved MiB", "storages", "layout s (med)", "min s",
                         "pinned s", "pageable s", "layout/pinned", "bit-identical", "reserve kept"], rows)


def peaks_table(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for fam in results:
        for r in fam["compare"]:
            rows.append([f"{fam['family']} {SIZES[fam['family']]}²", r["what"], fmt(r["measured_mib"]), fmt(r["estimate_mib"]),
                         "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"])
    return format_table(["model", "MiB", "measured", "estimate", "error"], rows, left=2)


# --- main ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _caps(text: str) -> dict[str, int]:
    caps = dict(DEFAULT_CAPS)
    for item in filter(None, (x.strip() for x in text.split(","))):
        fam, _, mb = item.partition("=")
        if fam not in FAMILIES or not mb.isdigit():
            raise argparse.ArgumentTypeError(f"--cap-mb wants FAMILY=MiB items (families: {', '.join(FAMILIES)}), got {item!r}")
        caps[fam] = int(mb)
    return caps


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl (default both)")
    ap.add_argument("--runs", type=int, default=None, help="layouts per reserve (default 3, dry run 1; the median is printed)")
    ap.add_argument("--reserves", type=_ints, default=[0, 512, 1024], help="reserve sizes in MiB (default 0,512,1024)")
    ap.add_argument("--cap-mb", type=_caps, default=dict(DEFAULT_CAPS),
                    help="allocator cap per family, FAMILY=MiB,... (default sd15=6144,sdxl=8192; 0 = none)")
    ap.add_argument("--bound-reps", type=int, default=3, help="pinned copy repetitions (default 3)")
    ap.add_argument("--steps", type=int, default=2, help="UNet forwards in the peak measurement (default 2)")
    ap.add_argument("--vae-precision", choices=("half", "full"), default="half")
    ap.add_argument("--webui", help="an A1111 tree: repositories/{stable-diffusion-stability-ai,generative-models}, configs/")
    ap.add_argument("--ldm-path", help="the stablediffusion clone holding ldm/ (default from --webui)")
    ap.add_argument("--sgm-path", help="the generative-models clone holding sgm/ (default from --webui)")
    ap.add_argument("--sd15-config", help="v1-inference.yaml (default <webui>/configs/v1-inference.yaml)")
    ap.add_argument("--sdxl-config", help="sd_xl_base.yaml (default from the generative-models clone)")
    ap.add_argument("--lowvram", help="command that runs lowvram (default: this Python -m lowvram, from this checkout)")
    ap.add_argument("--skip-layout", action="store_true")
    ap.add_argument("--skip-peaks", action="store_true")
    ap.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: layout on the simulated device at --scale, peaks code path at tiny width on the CPU")
    ap.add_argument("--scale", type=float, default=None, help="layout tensor sizes × this (default 1, dry-run 0.02)")
    ap.add_argument("--stage", metavar="DIR", help="copy ldm/sgm sources and configs into DIR (to carry), then exit")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = ap.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown family {bad[0]!r} (choose from {', '.join(FAMILIES)})")
    if args.scale is None:
        args.scale = 0.02 if args.dry_run else 1.0
    if args.runs is None:
        args.runs = 1 if args.dry_run else 3
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    return args


def cuda_problem(device: str) -> str | None:
    """Why this machine cannot run the benchmark for real; None when it can."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no usable GPU"
        return (f"gpu_layout: CUDA is not available (torch {torch.__version__}, {build}); this benchmark needs an "
                "NVIDIA GPU (--dry-run exercises it on the CPU)")
    if not device.startswith("cuda"):
        return f"gpu_layout: --device must be a CUDA device (got {device!r}); use --dry-run for the CPU"
    return None


def run_layouts(args: argparse.Namespace, backend: Any, report: dict[str, Any]) -> None:
    for family in args.families:
        t0 = time.perf_counter()
        try:
            report["layout"].append(layout_family(family, args, backend))
        except Exception as exc:  # e.g. the fake model does not fit the cap: say so, go on
            line = f"layout {family}: failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            print(line, flush=True)
            report["errors"].append(line)
            backend.cap(0)
            backend.release()
            continue
        print(f"  layout {family}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    print("\nlayout: real run_layout + TorchMover + CachePatch(torch.cuda); seconds vs the pinned D2H+H2D copy "
          "of the same bytes" if backend.name == "cuda" else
          "\nlayout (dry run): real run_layout on the simulated device; 'pinned' is a host copy here")
    print(layout_table(report["layout"]))
    for fam in report["layout"]:
        b = fam["bound"]
        if b:
            gbs = fam["moved_mib"] * MIB / 1e9
            print(f"  {fam['family']}: {fam['moved_mib']:.0f} MiB; pinned D2H {b['d2h_s']:.3f} s ({gbs / b['d2h_s']:.1f} GB/s), "
                  f"H2D {b['h2d_s']:.3f} s ({gbs / b['h2d_s']:.1f} GB/s); pageable round trip {b['pageable_s']:.3f} s")


def run_peaks(args: argparse.Namespace, backend: Any, paths: dict[str, Path | None], report: dict[str, Any]) -> None:
    for family in args.families:
        t0 = time.perf_counter()
        try:
            m = measure_family(family, args, backend, paths)
        except Exception as exc:  # the ldm/sgm code or its needs are missing, or the forward failed
            line = f"peaks {family}: skipped: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            print(line, flush=True)
            report["skipped"].append(line)
            backend.release()
            continue
        try:
            m["estimate"] = run_estimate(family, args, backend.total // MIB)
        except Exception as exc:
            m["estimate"] = None
            print(f"peaks {family}: no estimate: {exc}", flush=True)
        m["compare"] = compare_rows(m, m["estimate"])
        report["peaks"].append(m)
        full = m["full_unet_params"]
        check = "as expected" if full == EXPECTED_PARAMS[family] else f"EXPECTED {EXPECTED_PARAMS[family]:,}"
        print(f"  peaks {family}: {m['size']}² UNet {m['unet_params'] / 1e6:.2f} M params (full size {full:,}: {check}), "
              f"VAE {m['vae_params'] / 1e6:.2f} M; "
              f"UNet out {m['shapes'].get('unet_out')}, image {m['shapes'].get('image')}; "
              f"{m['sampling']['seconds_ms']} + {m['vae_decode']['seconds_ms']} ms; {time.perf_counter() - t0:.1f} s"
              + ("; " + "; ".join(m["notes"]) if m["notes"] else ""), flush=True)
    if report["peaks"]:
        sdp = report["machine"]["sdp_backends"]
        enabled = ", ".join(k for k, v in sdp.items() if v) or "n/a on CPU"
        if backend.name != "cuda":
            print("\npeaks (dry run): the real classes ran on the CPU in fp32 at 1/10 width and 64²: nothing measured")
        print(f"\npeaks: fp16 UNet, batch 2 (cond+uncond), {args.steps} step(s), no_grad + autocast; VAE decode "
              f"({args.vae_precision}) of one image; attention torch SDP (A1111 --opt-sdp-attention; enabled: {enabled}); "
              "text encoders are a stand-in tensor (not run); estimate: lowvram estimate --json, a1111, sdp, no offload")
        print(peaks_table(report["peaks"]))


def failures(report: dict[str, Any]) -> list[str]:
    bad = list(report["errors"])
    for fam in report["layout"]:
        for row in fam["rows"]:
            if not row["ok"] or not row["identical"] or row["cache_kept"] is False:
                bad.append(f"{fam['family']} reserve {row['reserve_mb']}: ok={row['ok']} identical={row['identical']} "
                           f"reserve kept={row['cache_kept']} {'; '.join(row['reasons'])}".rstrip())
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = resolve_paths(args)
    if args.stage:
        copied = stage(Path(args.stage), paths)
        print("\n".join(copied) if copied else "gpu_layout: nothing to stage (give --webui or --ldm-path/--sgm-path)")
        return 0 if copied else 1
    if not args.dry_run:
        problem = cuda_problem(args.device)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    backend: Any = SimBackend() if args.dry_run else CudaBackend(args.device)
    report: dict[str, Any] = {"schema": 1, "machine": backend.describe(), "layout": [], "peaks": [], "skipped": [], "errors": [],
                              "args": {k: v for k, v in vars(args).items() if k != "json"}}
    m = report["machine"]
    print(f"gpu_layout: {m['device']}, {m['total_mib']} MiB, torch {m['torch']}, CUDA {m['cuda']}; "
          f"families {','.join(args.families)}; runs {args.runs}; reserves {args.reserves} MiB", flush=True)
    start = time.perf_counter()
    if not args.skip_layout:
        run_layouts(args, backend, report)
    if not args.skip_peaks:
        run_peaks(args, backend, paths, report)
    report["seconds"] = time.perf_counter() - start
    report["failures"] = failures(report)
    for line in report["failures"]:
        print(f"FAILED: {line}")
    print(f"\ntotal {report['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
