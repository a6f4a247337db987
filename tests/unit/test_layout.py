"""The layout (docs/architecture.md#the-layout steps 1–5) on real torch CPU tensors through a device the test controls."""

from __future__ import annotations

import types

import pytest
import torch

from tests.fixtures.a1111_modules import InjectedFailure, SimDevice, hook_path, make_model

hook_path()
from lowvram_hook.layout import (  # noqa: E402
    MIB,
    CachePatch,
    TorchMover,
    collect,
    giant_kitten_active,
    is_ours,
    refusal,
    run_layout,
)


class RecordingCuda:
    """A torch.cuda stand-in whose empty_cache/ipc_collect count their calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

        def empty_cache() -> None:
            self.calls.append("empty_cache")

        def ipc_collect() -> None:
            self.calls.append("ipc_collect")

        self.empty_cache = empty_cache
        self.ipc_collect = ipc_collect
        self.original_empty_cache = empty_cache


@pytest.fixture
def scene():
    """A model on the "GPU", plus stray tensors, a view into a stray and a view into a UNet weight."""
    model = make_model()
    dev = SimDevice()
    dev.put_module(model)
    stray = torch.arange(4096, dtype=torch.float32)  # 16 KiB: larger than any UNet storage
    stray_view = stray[100:200]
    unet_weight = model.model.diffusion_model.middle.weight
    unet_view = unet_weight[3]  # a stray view into the UNet's storage
    small_stray = torch.ones(3)
    dev.put(stray, small_stray)
    cpu_only = torch.full((5,), 7.0)  # not on the device: must never move
    keep = {"stray": stray, "stray_view": stray_view, "unet_view": unet_view, "small": small_stray, "cpu": cpu_only}
    before = {name: t.clone() for name, t in keep.items()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    return types.SimpleNamespace(model=model, dev=dev, keep=keep, before=before, params_before=params_before,
                                 unet=model.model.diffusion_model, cuda=RecordingCuda())


def _all_device_tensors(s):
    return [*s.model.parameters(), *s.model.buffers(), s.keep["stray"], s.keep["stray_view"], s.keep["unet_view"],
            s.keep["small"]]


def _assert_everything_back(s) -> None:
    for t in _all_device_tensors(s):
        assert s.dev.holds(t), "a tensor was left off the device"
    for name, p in s.model.named_parameters():
        assert torch.equal(p.detach(), s.params_before[name]), f"{name} changed value"
    for name, t in s.keep.items():
        assert torch.equal(t, s.before[name]), f"{name} changed value"
    assert not s.dev.holds(s.keep["cpu"])


def test_unet_comes_back_first_smallest_first_then_the_rest(scene) -> None:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*scene.unet.parameters(), *scene.unet.buffers()]}
    unet_sizes = sorted(storages.values())
    result = run_layout(scene.unet, 256, scene.dev, CachePatch(scene.cuda))
    assert result.ok, result.reason
    back = [e[1] for e in scene.dev.events if e[0] == "to_device"]
    n_unet = len(unet_sizes)
    assert back[:n_unet] == unet_sizes, "UNet storages must come back first, smallest first"
    rest = back[n_unet:]
    assert rest == sorted(rest)
    # the VAE and the strays come after the UNet, though the small stray is smaller than most UNet storages
    small = scene.keep["small"].untyped_storage().nbytes()
    assert small in rest and small < max(unet_sizes)
    assert result.unet_groups == n_unet
    _assert_everything_back(scene)


def test_descending_order_is_honoured(scene) -> None:
    result = run_layout(scene.unet, 0, scene.dev, CachePatch(scene.cuda), order="descending")
    assert result.ok
    back = [e[1] for e in scene.dev.events if e[0] == "to_device"]
    n_unet = result.unet_groups
    assert back[:n_unet] == sorted(back[:n_unet], reverse=True)


def test_without_model_first_every_tensor_comes_back_by_size_alone(scene) -> None:
    """giant-kitten's "ignored model": no UNet-first pass, one list sorted by size."""
    result = run_layout(scene.unet, 0, scene.dev, CachePatch(scene.cuda), model_first=False)
    assert result.ok, result.reason
    back = [e[1] for e in scene.dev.events if e[0] == "to_device"]
    assert back == sorted(back)
    small = scene.keep["small"].untyped_storage().nbytes()
    unet_sizes = [t.untyped_storage().nbytes() for t in scene.unet.parameters()]
    assert back.index(small) < len(unet_sizes), "the small stray now comes back among the UNet's tensors"
    _assert_everything_back(scene)


def test_views_are_moved_once_and_stay_views(scene) -> None:
    stray, view, unet_view = scene.keep["stray"], scene.keep["stray_view"], scene.keep["unet_view"]
    weight = scene.unet.middle.weight
    result = run_layout(scene.unet, 64, scene.dev, CachePatch(scene.cuda))
    assert result.ok
    to_host = [e for e in scene.dev.events if e[0] == "to_host"]
    assert len(to_host) == result.groups  # one copy per storage, views are not copied again
    assert view.untyped_storage().data_ptr() == stray.untyped_storage().data_ptr()
    assert unet_view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    # still a view: writing through the base shows in the view
    stray[150] = -1.0
    assert view[50].item() == -1.0
    assert result.moved_bytes == sum(e[1] for e in to_host)
    _assert_everything_back_values_except_write(scene)


def _assert_everything_back_values_except_write(scene) -> None:
    for t in _all_device_tensors(scene):
        assert scene.dev.holds(t)


def test_reserve_is_allocated_before_the_unet_returns_and_freed_into_the_cache(scene) -> None:
    free_before = scene.dev.mem_get_info()[0] // MIB
    result = run_layout(scene.unet, 1024, scene.dev, CachePatch(scene.cuda))
    assert result.ok
    kinds = scene.dev.kinds()
    # step 3: release, measure, move out, real empty_cache + ipc_collect, allocate the reserve
    assert kinds[0] == "empty_cache"
    first_back = kinds.index("to_device")
    alloc = kinds.index("alloc_reserve")
    assert kinds.index("to_host") < kinds.index("ipc_collect") < alloc < first_back
    assert kinds[alloc - 2:alloc] == ["empty_cache", "ipc_collect"]
    # after everything is back: empty_cache, then the reserve is freed (into the cache) and nothing
    # releases the cache afterwards
    assert kinds[-2:] == ["empty_cache", "free_reserve"]
    assert ("alloc_reserve", 1024 * MIB) in scene.dev.events
    assert scene.dev.cached_free == 1024 * MIB
    assert result.free_mb == free_before
    assert result.patched


def test_the_patch_keeps_the_cache_and_lifting_restores_the_originals(scene) -> None:
    cuda = scene.cuda
    original = cuda.empty_cache
    patch = CachePatch(cuda)
    assert run_layout(scene.unet, 512, scene.dev, patch).ok
    assert is_ours(cuda.empty_cache) and is_ours(cuda.ipc_collect)
    cuda.empty_cache()  # what A1111's torch_gc does at every job: must not reach the original
    cuda.ipc_collect()
    assert cuda.calls == []
    assert patch.lift()
    assert cuda.empty_cache is original
    cuda.empty_cache()
    assert cuda.calls == ["empty_cache"]


def test_patching_the_real_torch_cuda_is_undone_exactly(scene, monkeypatch) -> None:
    real_empty, real_ipc = torch.cuda.empty_cache, torch.cuda.ipc_collect
    patch = CachePatch(torch.cuda)
    try:
        assert run_layout(scene.unet, 64, scene.dev, patch).ok
        assert torch.cuda.empty_cache is not real_empty
        torch.cuda.ipc_collect()  # the real one raises on a CPU build; the patch must not
    finally:
        patch.lift()
    assert torch.cuda.empty_cache is real_empty and torch.cuda.ipc_collect is real_ipc


def test_no_reserve_means_no_patch(scene) -> None:
    patch = CachePatch(scene.cuda)
    result = run_layout(scene.unet, 0, scene.dev, patch)
    assert result.ok and not result.patched and not patch.active
    assert "alloc_reserve" not in scene.dev.kinds()


@pytest.mark.parametrize("fail_on", [("to_device", 1), ("to_device", 4), ("to_device", 15), ("to_host", 1),
                                     ("to_host", 7), ("alloc_reserve", 1)])
def test_a_failure_anywhere_puts_every_tensor_back_and_restores_the_functions(scene, fail_on) -> None:
    scene.dev.fail_on = fail_on
    cuda = scene.cuda
    original = cuda.empty_cache
    patch = CachePatch(cuda)
    result = run_layout(scene.unet, 512, scene.dev, patch)
    assert not result.ok and result.rolled_back
    assert "injected failure" in result.reason
    assert "could not be put back" not in result.reason
    _assert_everything_back(scene)
    assert not patch.active and cuda.empty_cache is original
    # the views still share their base's storage after the rollback
    assert scene.keep["stray_view"].untyped_storage().data_ptr() == scene.keep["stray"].untyped_storage().data_ptr()


def test_a_failed_rollback_is_reported_not_raised(scene) -> None:
    class Broken(SimDevice):
        def to_device(self, storage):
            raise InjectedFailure("device lost")

    dev = Broken()
    dev.put_module(scene.model)
    result = run_layout(scene.unet, 0, dev, CachePatch(scene.cuda))
    assert not result.ok and "could not be put back" in result.reason


def test_a_second_layout_lifts_the_first_patch_before_measuring(scene) -> None:
    cuda = scene.cuda
    patch = CachePatch(cuda)
    first = run_layout(scene.unet, 1024, scene.dev, patch)
    seen: list[bool] = []

    class Watching(SimDevice):
        def empty_cache(self) -> None:
            seen.append(is_ours(cuda.empty_cache))
            super().empty_cache()

    dev2 = Watching(on_gpu=scene.dev.on_gpu, cached_free=scene.dev.cached_free)
    second = run_layout(scene.unet, 2048, dev2, patch)
    assert first.ok and second.ok
    assert seen[0] is False, "the earlier patch must be lifted before the real empty_cache"
    # the first reserve was released before `free` was read: the reading does not shrink
    assert second.free_mb == first.free_mb
    assert dev2.cached_free == 2048 * MIB


def test_the_gc_scan_finds_tensors_outside_the_model(scene) -> None:
    hidden = {"cond": torch.randn(32)}
    scene.dev.put(hidden["cond"])
    found = collect(scene.unet, scene.dev)
    storages = {g.storage.data_ptr() for g in found.groups}
    assert hidden["cond"].untyped_storage().data_ptr() in storages
    assert scene.keep["cpu"].untyped_storage().data_ptr() not in storages
    assert all(g.unet for g in found.groups[: sum(1 for g in found.groups if g.unet)])


def test_inference_tensors_are_left_alone(scene) -> None:
    with torch.inference_mode():
        frozen = torch.ones(10)
    scene.dev.put(frozen)
    result = run_layout(scene.unet, 0, scene.dev, CachePatch(scene.cuda))
    assert result.ok and result.skipped >= 1
    assert scene.dev.holds(frozen)


def test_preconditions_refuse_before_anything_moves(scene) -> None:
    model, dev, cuda = scene.model, scene.dev, scene.cuda
    assert refusal(model, dev, cuda) is None
    assert "CUDA" in (refusal(model, SimDevice(cuda=False), cuda) or "")
    assert "no model" in (refusal(None, dev, cuda) or "")
    model.lowvram = True
    assert "medvram" in (refusal(model, dev, cuda) or "")
    model.lowvram = False
    opts = types.SimpleNamespace(medvram=False, lowvram=False, medvram_sdxl=True)
    assert refusal(model, dev, cuda, opts) is None  # --medvram-sdxl does not swap an SD1.5 model
    model.is_sdxl = True
    assert "medvram" in (refusal(model, dev, cuda, opts) or "")
    model.is_sdxl = False

    def GK_Noop(*args, **kwargs):
        return None

    cuda.empty_cache = GK_Noop
    assert "giant-kitten" in (refusal(model, dev, cuda) or "")
    no_unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=None))
    cuda.empty_cache = cuda.original_empty_cache
    assert "UNet" in (refusal(no_unet, dev, cuda) or "")
    assert dev.events == []


def test_a_unet_not_on_the_device_is_refused_without_moving(scene) -> None:
    dev = SimDevice()  # knows nothing of the model: everything "on the CPU"
    result = run_layout(scene.unet, 64, dev, CachePatch(scene.cuda))
    assert not result.ok and "UNet" in result.reason
    assert dev.events == []


def test_lifting_leaves_a_function_someone_else_installed(scene) -> None:
    cuda = scene.cuda
    patch = CachePatch(cuda)
    assert run_layout(scene.unet, 64, scene.dev, patch).ok

    def GK_Noop():
        return None

    cuda.empty_cache = GK_Noop  # giant-kitten patched after us
    assert not patch.intact()
    assert patch.lift() is False
    assert cuda.empty_cache is GK_Noop


def test_a_noop_of_ours_that_giant_kitten_saved_and_put_back_still_leads_to_the_real_function(scene) -> None:
    """giant-kitten saves torch.cuda.empty_cache when it is imported and restores that on exit.
    Imported again while our patch was on (a UI reload), it saves our no-op; after its own run and
    exit our no-op is back, but no longer in our patch's books. The next layout must still reach
    the real empty_cache (or the model returns to its old blocks), and lifting must restore it."""
    cuda = scene.cuda
    real = cuda.empty_cache
    patch = CachePatch(cuda)
    assert run_layout(scene.unet, 64, scene.dev, patch).ok
    gk_saved = cuda.empty_cache  # giant-kitten imported now: "the original" is our no-op

    def GK_Noop():
        return None

    cuda.empty_cache = GK_Noop  # giant-kitten activated
    assert giant_kitten_active(cuda)
    assert patch.lift() is False  # what the hook does on seeing it: theirs stays
    cuda.empty_cache = gk_saved  # giant-kitten disabled: it restores what it saved
    assert not giant_kitten_active(cuda)
    mover = TorchMover("cuda", patch)
    mover.empty_cache()
    assert cuda.calls == ["empty_cache"], "the real empty_cache must be reached through the stale no-op"
    patch.install()
    assert is_ours(cuda.empty_cache) and patch.active
    assert patch.lift() is True
    assert cuda.empty_cache is real


class SpillingDevice(SimDevice):
    """A card with sysmem fallback: what does not fit in dedicated memory lands in shared memory,
    stays there when dedicated memory frees up later, and mem_get_info sees dedicated only."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.shared: set[int] = set()
        self.live_reserve = 0

    def dedicated_used(self) -> int:
        resident = sum(n for ptr, n in self.on_gpu.items() if ptr not in self.shared)
        return resident + self.cached_free + self.live_reserve + self.other_mb * MIB

    def mem_get_info(self) -> tuple[int, int]:
        total = self.total_mb * MIB
        return max(0, total - self.dedicated_used()), total

    def to_device(self, storage):
        spills = self.dedicated_used() + storage.nbytes() > self.total_mb * MIB
        new = super().to_device(storage)
        if spills:
            self.shared.add(new.data_ptr())
        return new

    def to_host(self, storage):
        self.shared.discard(storage.data_ptr())
        return super().to_host(storage)

    def alloc_reserve(self, nbytes: int):
        block = super().alloc_reserve(nbytes)
        self.live_reserve += nbytes
        return block

    def free_reserve(self, handle) -> None:
        self.live_reserve -= handle.lowvram_nbytes
        super().free_reserve(handle)


def test_free_is_not_inflated_by_a_model_tail_an_earlier_reserve_pushed_into_shared_memory() -> None:
    """A reserve above `free` (the formula's free + overflow always is) makes the UNet's tail spill.
    Releasing that reserve later leaves the tail in shared memory, so the dedicated free reading
    equals the old reserve; recorded as `free` it would grow the next reserve, run after run."""
    unet = torch.nn.Module()
    for i in range(4):
        unet.register_parameter(f"w{i}", torch.nn.Parameter(torch.zeros(MIB)))  # 4 MiB each, 16 MiB
    dev = SpillingDevice(total_mb=24, other_mb=0)
    dev.put_module(unet)
    patch = CachePatch(RecordingCuda())
    first = run_layout(unet, 12, dev, patch, scan=False)
    assert first.ok and first.free_mb == 8  # 24 − 16: model resident, nothing reserved
    assert dev.shared, "the 12 MiB reserve pushed part of the UNet into shared memory"
    second = run_layout(unet, 12, dev, patch, scan=False)
    assert second.ok
    assert second.free_mb == 8, "free must still be card − model, not the released reserve"
    assert all(dev.holds(p) for p in unet.parameters())


# -- the real TorchMover copy path, with the device side on the CPU ---------------------------
# SimDevice above clones storages its own way; these drive TorchMover's own copies (copy_storage,
# _rebind, the rollback) on whatever torch runs the suite (tests/unit/test_torch_matrix.py runs this
# file under torch 2.1.2 and the newest too). Only the torch.cuda calls are faked.

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)


@pytest.fixture
def cpu_cuda(monkeypatch):
    """The torch.cuda functions TorchMover calls, made harmless on a CPU build; records syncs."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 1024 * MIB, 8 * 1024 * MIB))
    return calls


def _real_scene():
    """A model of mixed dtypes, strays of every dtype, views into both; what each held before."""
    model = make_model()
    unet = model.model.diffusion_model
    unet.out.half()
    unet.time_embed.to(torch.bfloat16)
    strays = [(torch.arange(40) % 7 == 0).to(dt) if dt is torch.bool else (torch.arange(40) * 3).to(dt)
              for dt in DTYPES]
    base = torch.randn(64, 8)
    views = {"row": base[5], "col": base[:, 3], "t": base.t(), "unet": unet.middle.weight[7], "bias": unet.out.bias[1:3]}
    tensors = {**{f"p.{n}": p for n, p in model.named_parameters()}, **{f"b.{n}": b for n, b in model.named_buffers()},
               **{f"stray.{i}": t for i, t in enumerate(strays)}, "base": base, **{f"view.{k}": v for k, v in views.items()}}
    # The old storage itself is kept: alive, its address cannot be handed to a copy.
    before = {k: (t.detach().clone(), t.dtype, t.storage_offset(), tuple(t.size()), tuple(t.stride()),
                  t.untyped_storage()) for k, t in tensors.items()}
    extra = [*model.parameters(), *model.buffers(), *strays, base, *views.values()]  # what the gc scan finds
    return types.SimpleNamespace(model=model, unet=unet, tensors=tensors, before=before, extra=extra, base=base,
                                 views=views)


def _check_real_scene(s, *, moved: bool) -> None:
    """Same values, dtypes and geometry; views still share their base's storage; `moved`: every
    storage is a new one (the copies really happened)."""
    for k, t in s.tensors.items():
        value, dtype, offset, size, stride, old = s.before[k]
        assert t.dtype == dtype, k
        assert (t.storage_offset(), tuple(t.size()), tuple(t.stride())) == (offset, size, stride), k
        assert torch.equal(t.detach(), value), f"{k} changed value"
        assert not t.is_inference(), k
        if moved:
            assert t.untyped_storage().data_ptr() != old.data_ptr(), f"{k} was not copied"
    for name, v in s.views.items():
        owner = s.unet.middle.weight if name == "unet" else s.unet.out.bias if name == "bias" else s.base
        assert v.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr(), f"view {name} lost its base"
    s.base[5, 0] = 1234.0  # written through the base, seen through the views
    assert s.views["row"][0].item() == 1234.0 and s.views["t"][0, 5].item() == 1234.0
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in s.model.parameters())


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_mover_copies_a_storage_out_and_back_byte_for_byte(dtype, cpu_cuda) -> None:
    t = (torch.arange(1000) % 5 == 1).to(dtype) if dtype is torch.bool else (torch.arange(1000) - 300).to(dtype)
    storage = t.untyped_storage()
    mover = TorchMover("cpu", CachePatch(RecordingCuda()), device_type="cpu")
    out = mover.to_host(storage)
    back = mover.to_device(out)
    for copy in (out, back):
        assert copy.nbytes() == storage.nbytes() and copy.device == storage.device
        assert copy.data_ptr() not in (storage.data_ptr(), out.data_ptr() if copy is back else 0)
        assert torch.equal(torch.empty(0, dtype=dtype).set_(copy, 0, t.size(), t.stride()), t)


def test_torch_mover_copies_an_empty_storage() -> None:
    mover = TorchMover("cpu", device_type="cpu")
    assert mover.to_host(torch.empty(0).untyped_storage()).nbytes() == 0


def test_torch_mover_keeps_to_cuda_in_the_ui() -> None:
    """The UI passes devices.device, which may be "cpu" or "mps": the layout still means CUDA."""
    assert TorchMover("cpu").device.type == "cuda"
    assert TorchMover(None).device.type == "cuda"
    assert TorchMover("cuda:1").device == torch.device("cuda:1")


def test_the_real_mover_lays_out_every_dtype_and_view_and_keeps_them(cpu_cuda) -> None:
    s = _real_scene()
    cuda = RecordingCuda()
    patch = CachePatch(cuda)
    mover = TorchMover("cpu", patch, device_type="cpu")
    try:
        result = run_layout(s.unet, 1, mover, patch, objects=lambda: s.extra)
        assert result.ok, result.reason
        assert result.patched and cuda.calls[:1] == ["empty_cache"] and cpu_cuda == ["synchronize"]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in s.tensors.values()}
        assert result.groups == len(storages) and result.moved_bytes == sum(storages.values())
        _check_real_scene(s, moved=True)
    finally:
        patch.lift()


class FailingMover(TorchMover):
    """The real mover, failing once at the n-th call of one step; the rollback copies for real."""

    def __init__(self, step: str, n: int) -> None:
        super().__init__("cpu", CachePatch(RecordingCuda()), device_type="cpu")
        self.step, self.n, self.seen = step, n, 0

    def _maybe_fail(self, step: str) -> None:
        if step == self.step:
            self.seen += 1
            if self.seen == self.n:
                raise InjectedFailure(f"injected failure on {step} #{self.n}")

    def to_host(self, storage):
        self._maybe_fail("to_host")
        return super().to_host(storage)

    def to_device(self, storage):
        self._maybe_fail("to_device")
        return super().to_device(storage)

    def synchronize(self) -> None:
        self._maybe_fail("synchronize")
        super().synchronize()


@pytest.mark.parametrize(("step", "n"), [("to_host", 1), ("to_host", 9), ("to_device", 1), ("to_device", 6),
                                         ("synchronize", 1)])
def test_the_real_mover_rolls_a_failure_back_with_every_tensor_intact(step, n, cpu_cuda) -> None:
    s = _real_scene()
    mover = FailingMover(step, n)
    result = run_layout(s.unet, 1, mover, mover.patch, objects=lambda: s.extra)
    assert not result.ok and result.rolled_back, result.reason
    assert f"injected failure on {step}" in result.reason and "could not be put back" not in result.reason
    assert not mover.patch.active
    _check_real_scene(s, moved=False)


def test_a_layout_inside_inference_mode_leaves_no_inference_tensors(cpu_cuda) -> None:
    """Tensors made inside inference mode are inference tensors, which collect() skips: had the
    parameters become some, the next layout would find no UNet to move."""
    s = _real_scene()
    patch = CachePatch(RecordingCuda())
    mover = TorchMover("cpu", patch, device_type="cpu")
    with torch.inference_mode():
        first = run_layout(s.unet, 0, mover, patch, objects=lambda: s.extra)
    assert first.ok, first.reason
    _check_real_scene(s, moved=True)
    second = run_layout(s.unet, 0, mover, patch, objects=lambda: s.extra)
    assert second.ok and second.unet_groups == first.unet_groups


# -- the same on a real GPU ---------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda_only
def test_gpu_layout_keeps_the_reserve_cached_and_everything_on_the_gpu() -> None:
    model = make_model().cuda()
    stray = torch.randn(1 << 20, device="cuda")
    view = stray[10:20]
    patch = CachePatch(torch.cuda)
    mover = TorchMover("cuda", patch)
    try:
        result = run_layout(model.model.diffusion_model, 64, mover, patch)
        assert result.ok, result.reason
        assert all(p.is_cuda for p in model.parameters()) and stray.is_cuda
        assert view.untyped_storage().data_ptr() == stray.untyped_storage().data_ptr()
        torch.cuda.empty_cache()  # patched: the freed reserve stays cached
        cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        assert cached >= 64 * MIB
    finally:
        patch.lift()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 64 * MIB


@pytest.mark.gpu
@cuda_only
def test_gpu_layout_rolls_back_a_failure() -> None:
    model = make_model().cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = CachePatch(torch.cuda)

    class Failing(TorchMover):
        n = 0

        def to_device(self, storage):
            Failing.n += 1
            if Failing.n == 3:
                raise InjectedFailure("injected")
            return super().to_device(storage)

    result = run_layout(model.model.diffusion_model, 64, Failing("cuda", patch), patch)
    assert not result.ok and result.rolled_back
    assert all(p.is_cuda for p in model.parameters())
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert not is_ours(torch.cuda.empty_cache)
