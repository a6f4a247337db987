"""The layout (docs/architecture.md#the-layout, giant-kitten's idea done safely).

With the driver's sysmem fallback on, whatever does not fit in dedicated VRAM spills into shared
(system) memory, and what spills is decided by allocation order. The layout moves every CUDA
tensor out, allocates a *reserve* first (so it lands in dedicated memory), brings the UNet back
smallest-first and then the rest, and frees the reserve into PyTorch's caching allocator: the
next generation's activations are served from that dedicated block while the tail of the model is
what spills. A patch keeps `torch.cuda.empty_cache`/`ipc_collect` from handing the block back to
the driver.

Unlike giant-kitten: preconditions are checked before anything moves; tensors are grouped by
storage so a view is never copied twice (and stays a view); every moved storage is tracked so a
failure at any step puts everything back on the device and restores the patched functions.

The device boundary (`Mover`) is injectable, so the algorithm can be driven on CPU tensors by a
device the test controls.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

try:
    import torch
except Exception:  # pragma: no cover - the hook then disables itself in host.py
    torch = None  # type: ignore[assignment]

MIB = 1024 * 1024
GK_NOOP = "GK_Noop"  # giant-kitten's replacement for empty_cache/ipc_collect
PATCHED_NAMES = ("empty_cache", "ipc_collect")


class Mover(Protocol):
    """The device boundary: what the layout needs from CUDA, and nothing else."""

    def available(self) -> bool: ...
    def on_device(self, tensor: Any) -> bool: ...
    def to_host(self, storage: Any) -> Any: ...
    def to_device(self, storage: Any) -> Any: ...
    def empty_cache(self) -> None: ...
    def ipc_collect(self) -> None: ...
    def synchronize(self) -> None: ...
    def mem_get_info(self) -> tuple[int, int]: ...
    def alloc_reserve(self, nbytes: int) -> Any: ...
    def free_reserve(self, handle: Any) -> None: ...


def _noop_factory(name: str, original: Callable[..., Any]) -> Callable[..., None]:
    def lowvram_keep_cache(*_args: Any, **_kwargs: Any) -> None:
        return None

    lowvram_keep_cache._lowvram_noop = True  # type: ignore[attr-defined]
    # The real function travels with the no-op: an extension that saved our no-op as "the
    # original" (giant-kitten imported again by a UI reload while the patch was on) and put it back
    # later must not leave the real empty_cache unreachable.
    lowvram_keep_cache._lowvram_original = original  # type: ignore[attr-defined]
    lowvram_keep_cache.__qualname__ = f"lowvram_keep_cache[{name}]"
    return lowvram_keep_cache


def is_ours(func: Any) -> bool:
    return bool(getattr(func, "_lowvram_noop", False))


def unwrap(func: Any) -> Any:
    """The real function behind (possibly stale) no-ops of ours; `func` itself when not ours."""
    for _ in range(8):
        if not is_ours(func):
            return func
        func = getattr(func, "_lowvram_original", None)
    return None


class CachePatch:
    """Replaces `empty_cache`/`ipc_collect` on a namespace (torch.cuda) with no-ops, restorably.

    A1111's `devices.torch_gc()` looks them up at call time on every job, so while the patch is in
    place the freed reserve stays in PyTorch's cache. `lift()` puts the originals back, unless
    someone replaced our no-op since (giant-kitten restoring what it saved): theirs stays.
    """

    def __init__(self, namespace: Any) -> None:
        self.namespace = namespace
        self.originals: dict[str, Callable[..., Any]] = {}

    @property
    def active(self) -> bool:
        return bool(self.originals)

    def intact(self) -> bool:
        """Our no-ops are still the ones installed (nobody lifted the patch behind our back)."""
        return all(is_ours(getattr(self.namespace, n, None)) for n in self.originals)

    def real(self, name: str) -> Callable[..., Any] | None:
        if name in self.originals:
            return self.originals[name]
        return unwrap(getattr(self.namespace, name, None))

    def install(self) -> None:
        for name in PATCHED_NAMES:
            if name in self.originals:
                continue
            # A stale no-op of ours (put back by someone who had saved it) is replaced too, so
            # that lift() restores the real function behind it.
            original = unwrap(getattr(self.namespace, name, None))
            if original is None:
                continue
            self.originals[name] = original
            setattr(self.namespace, name, _noop_factory(name, original))

    def lift(self) -> bool:
        """Restore the originals; False when a function was no longer ours (left as it was)."""
        clean = True
        for name, original in list(self.originals.items()):
            if is_ours(getattr(self.namespace, name, None)):
                setattr(self.namespace, name, original)
            else:
                clean = False
            del self.originals[name]
        return clean


def giant_kitten_active(namespace: Any) -> bool:
    return getattr(getattr(namespace, "empty_cache", None), "__name__", "") == GK_NOOP


def copy_storage(storage: Any, device: Any) -> Any:
    """A new copy of an untyped storage on `device`.

    Done through a uint8 tensor over the whole storage because `UntypedStorage.to()` only exists
    from torch 2.2 on (A1111 1.8–1.10 install 2.1.2), while `Tensor.set_(UntypedStorage)`,
    `Tensor.to(..., copy=True)` and `Tensor.untyped_storage()` exist in every torch from 2.0 on.
    One path for every version: nothing to pick by feature, nothing that only some versions run.
    `copy=True` always allocates, so the result never aliases the source (as `.to()` would when
    the storage already sits on `device`).
    """
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    return whole.to(device=device, copy=True).untyped_storage()


class TorchMover:
    """The real boundary: CUDA storages copied to host memory and back.

    `device_type` is the kind of device the layout empties: "cuda" in the UI; the tests pass "cpu"
    so the real copy path (copy_storage, _rebind, the rollback) runs without a GPU, with only the
    `torch.cuda` calls faked. Host copies are not pinned: the caching host allocator would keep
    a whole model's worth of page-locked RAM in the UI process (torch 2.1 cannot release it).
    """

    def __init__(self, device: Any = None, patch: CachePatch | None = None, *, device_type: str = "cuda") -> None:
        self.device = torch.device(device if device is not None else device_type)
        if self.device.type != device_type:
            self.device = torch.device(device_type)
        self.host = torch.device("cpu")
        self.patch = patch

    def available(self) -> bool:
        try:
            return bool(torch.cuda.is_available())
        except Exception:
            return False

    def on_device(self, tensor: Any) -> bool:
        dev = tensor.device
        if dev.type != self.device.type:
            return False
        return self.device.index is None or dev.index == self.device.index

    def to_host(self, storage: Any) -> Any:
        return copy_storage(storage, self.host)

    def to_device(self, storage: Any) -> Any:
        return copy_storage(storage, self.device)

    def _call_real(self, name: str) -> None:
        func = self.patch.real(name) if self.patch is not None else getattr(torch.cuda, name, None)
        if func is not None and not is_ours(func):
            func()

    def empty_cache(self) -> None:
        self._call_real("empty_cache")

    def ipc_collect(self) -> None:
        try:  # raises on CPU builds and where IPC is unsupported
            self._call_real("ipc_collect")
        except Exception:
            pass

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)

    def alloc_reserve(self, nbytes: int) -> Any:
        block = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        block.fill_(1)  # written, so the driver commits the pages (in dedicated memory: it is free now)
        return block

    def free_reserve(self, handle: Any) -> None:
        handle.set_()  # drop its storage now: the block goes to the caching allocator's free list

    def gpu_uuid(self) -> str | None:
        """The card's UUID as NVML spells it ("GPU-…"), so lowvram matches records to a GPU across UIs.
        torch >= 2.2 has `props.uuid` (torch 2.1.2, A1111 1.8's, does not): None there."""
        try:
            uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
        except Exception:
            return None
        text = str(uuid) if uuid is not None else ""
        if not text:
            return None
        return text if text.upper().startswith("GPU-") else f"GPU-{text}"

    # Readings for the observations (not used by the layout itself).
    def memory_reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self.device))

    def memory_allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reset_peaks(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[int, int]:
        return int(torch.cuda.max_memory_allocated(self.device)), int(torch.cuda.max_memory_reserved(self.device))

    def num_ooms(self) -> int:
        return int(torch.cuda.memory_stats(self.device).get("num_ooms", 0))


@dataclass
class Group:
    """Tensors sharing one storage: copied once, every member re-pointed at the copy."""

    storage: Any
    nbytes: int
    unet: bool
    members: list[tuple[Any, int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    on_host: bool = False


@dataclass
class Collected:
    groups: list[Group]
    skipped: int = 0  # tensors left alone (inference tensors, sparse/opaque layouts)
    scanned: int = 0


def _storage_key(tensor: Any, storage: Any) -> Any:
    nbytes = storage.nbytes()
    return storage.data_ptr() if nbytes else ("empty", id(tensor))


def collect(unet: Any, mover: Mover, *, scan: bool = True,
            objects: Callable[[], Iterable[Any]] = gc.get_objects) -> Collected:
    """The UNet's parameters and buffers first, then every other device tensor a gc scan finds."""
    groups: dict[Any, Group] = {}
    out = Collected([])

    def add(t: Any, is_unet: bool) -> None:
        if not mover.on_device(t):
            return
        if t.layout != torch.strided or t.is_inference():
            out.skipped += 1
            return
        try:
            storage = t.untyped_storage()
        except Exception:
            out.skipped += 1
            return
        key = _storage_key(t, storage)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(storage, storage.nbytes(), is_unet)
            out.groups.append(group)
        if id(t) in group.seen:
            return
        group.seen.add(id(t))
        group.members.append((t, t.storage_offset(), tuple(t.size()), tuple(t.stride())))

    for p in unet.parameters():
        add(p, True)
    for b in unet.buffers():
        add(b, True)
    if scan:
        tensor_type = torch.Tensor
        for obj in objects():
            # type(), not isinstance(): isinstance falls back to `obj.__class__`, which some lazy
            # modules turn into a warning or an import.
            if issubclass(type(obj), tensor_type):
                out.scanned += 1
                try:
                    add(obj, False)
                except Exception:  # an exotic tensor subclass: leave it where it is
                    out.skipped += 1
    return out


def _rebind(group: Group, storage: Any) -> None:
    """Re-point every member at `storage`, keeping offset, size and stride (views stay views).

    Outside inference mode: a tensor made inside it is an inference tensor, and a parameter whose
    `.data` became one would be skipped by every later layout (collect() leaves those alone).
    """
    with torch.inference_mode(False):
        for t, offset, size, stride in group.members:
            t.data = torch.empty(0, dtype=t.dtype, device=storage.device).set_(storage, offset, size, stride)


def _move(group: Group, copy: Callable[[Any], Any]) -> None:
    new = copy(group.storage)
    _rebind(group, new)
    group.storage = new
    group.on_host = not group.on_host


def move_back_order(groups: list[Group], order: str, model_first: bool = True) -> list[Group]:
    """UNet first, then the rest, each part by size (smallest first for "ascending"); without
    `model_first` (giant-kitten's "ignored model") every tensor is sorted as one list."""

    def part(items: list[Group]) -> list[Group]:
        if order == "original":
            return items
        return sorted(items, key=lambda g: g.nbytes, reverse=(order == "descending"))

    if not model_first:
        return part(list(groups))
    return part([g for g in groups if g.unet]) + part([g for g in groups if not g.unet])


@dataclass
class LayoutResult:
    ok: bool
    reason: str
    free_mb: int | None = None  # dedicated VRAM free with the model resident and nothing reserved
    total_mb: int | None = None
    reserve_mb: int = 0
    moved_bytes: int = 0
    groups: int = 0
    unet_groups: int = 0
    skipped: int = 0
    seconds: float = 0.0
    patched: bool = False
    rolled_back: bool = False


def refusal(model: Any, mover: Mover, cuda_namespace: Any, cmd_opts: Any = None) -> str | None:
    """Why the layout must not run, checked before anything moves; None when it may."""
    if not mover.available():
        return "CUDA is not available"
    if model is None:
        return "no model is loaded"
    if hasattr(model, "forge_objects"):
        return "Forge manages model memory itself"
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None:
        return "the model has no UNet at model.model.diffusion_model"
    swapping = bool(getattr(model, "lowvram", False))
    if cmd_opts is not None:
        swapping = swapping or bool(getattr(cmd_opts, "lowvram", False) or getattr(cmd_opts, "medvram", False))
        swapping = swapping or bool(getattr(cmd_opts, "medvram_sdxl", False) and getattr(model, "is_sdxl", False))
    if swapping:
        return "--medvram/--lowvram swap the model between RAM and VRAM; the layout needs it resident"
    if giant_kitten_active(cuda_namespace):
        return "giant-kitten's layout is active; leaving it alone"
    return None


def run_layout(unet: Any, reserve_mb: int, mover: Mover, patch: CachePatch, *, order: str = "ascending",
               model_first: bool = True, scan: bool = True, clock: Callable[[], float] = time.perf_counter,
               objects: Callable[[], Iterable[Any]] = gc.get_objects) -> LayoutResult:
    """Steps 2–5 of docs/architecture.md#the-layout. Never raises: a failure is rolled back and reported."""
    start = clock()
    reserve_bytes = max(0, int(reserve_mb)) * MIB
    collected = collect(unet, mover, scan=scan, objects=objects)
    groups = collected.groups
    unet_groups = sum(1 for g in groups if g.unet)
    base = {"reserve_mb": max(0, int(reserve_mb)), "groups": len(groups), "unet_groups": unet_groups,
            "skipped": collected.skipped}
    if unet_groups == 0:
        return LayoutResult(False, "the UNet has no tensors on the GPU", **base)
    reserve = None
    moved = 0
    free_mb = total_mb = None
    try:
        patch.lift()  # an earlier layout's patch: the real empty_cache below must release its reserve
        mover.empty_cache()
        free, total = mover.mem_get_info()
        free_mb, total_mb = free // MIB, total // MIB
        for group in groups:
            _move(group, mover.to_host)
            moved += group.nbytes
        gc.collect()
        mover.empty_cache()
        mover.ipc_collect()
        # The reading above assumes the model sits in dedicated memory. After an earlier layout
        # whose reserve exceeded `free`, the model's tail spilled into shared memory and stays there
        # when that reserve is released, so the reading comes out as the old reserve (and the
        # formula would grow run after run). With nothing of ours on the card now, free − what
        # comes back is the true figure: take the smaller.
        empty_free, _ = mover.mem_get_info()
        free_mb = min(free_mb, max(0, empty_free - moved) // MIB)
        if reserve_bytes:
            reserve = mover.alloc_reserve(reserve_bytes)
        for group in move_back_order(groups, order, model_first):
            _move(group, mover.to_device)
        mover.synchronize()
        mover.empty_cache()
        if reserve is not None:
            mover.free_reserve(reserve)
            reserve = None
        if reserve_bytes:
            patch.install()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip()
        problems = _roll_back(groups, mover, reserve)
        patch.lift()
        if problems:
            reason += f"; {problems} storage(s) could not be put back"
        return LayoutResult(False, reason, free_mb, total_mb, moved_bytes=moved, seconds=clock() - start,
                            rolled_back=True, **base)
    return LayoutResult(True, "done", free_mb, total_mb, moved_bytes=moved, seconds=clock() - start,
                        patched=patch.active, **base)


def _roll_back(groups: list[Group], mover: Mover, reserve: Any) -> int:
    """Every tensor back on the device; returns how many storages could not be restored."""
    if reserve is not None:
        try:
            mover.free_reserve(reserve)
        except Exception:
            pass
        reserve = None
    problems = 0
    for group in groups:
        try:
            if group.on_host:
                _move(group, mover.to_device)
            else:
                _rebind(group, group.storage)  # a move cut short: re-point every member at the original
        except Exception:
            problems += 1
    return problems
