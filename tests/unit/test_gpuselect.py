"""GPU choice as CUDA makes it: visible list, order, the UI's device flag; else the largest."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lowvram.core.facts import CudaEnv, Facts, GpuFacts, SystemFacts
from lowvram.core.gpuselect import select_gpu, visible_gpus

SMALL = GpuFacts(index=0, uuid="GPU-aaaa1111-0000", name="NVIDIA GeForce GTX 1050 Ti", vram_total_mb=4096,
                 compute_capability="6.1")
BIG = GpuFacts(index=1, uuid="GPU-bbbb2222-0000", name="NVIDIA GeForce RTX 3060", vram_total_mb=12288,
               compute_capability="8.6")


def facts(*gpus: GpuFacts, visible: str | None = None, order: str | None = None, err: str | None = None) -> Facts:
    return Facts(system=SystemFacts(os="linux"), gpus=gpus, cuda=CudaEnv(visible, order), nvml_error=err)


def test_no_gpu() -> None:
    choice = select_gpu(facts(err="NVIDIA driver not found (NVML library missing)"))
    assert choice.gpu is None and "NVML library missing" in choice.reason


def test_single_gpu_is_not_pinned() -> None:
    choice = select_gpu(facts(SMALL))
    assert choice.gpu == SMALL and choice.pin_uuid is None and choice.index_in_visible == 0


def test_largest_is_picked_and_pinned_by_uuid() -> None:
    choice = select_gpu(facts(SMALL, BIG))
    assert choice.gpu == BIG
    assert choice.pin_uuid == "GPU-bbbb2222-0000"
    assert "largest of 2" in choice.reason


def test_cuda_orders_fastest_first_unless_pci_bus_id() -> None:
    assert [g.index for g in visible_gpus((SMALL, BIG), None, None)] == [1, 0]
    assert [g.index for g in visible_gpus((SMALL, BIG), None, "PCI_BUS_ID")] == [0, 1]


def test_device_flag_indexes_into_the_cuda_order() -> None:
    # Fastest first: device 1 is the small card.
    choice = select_gpu(facts(SMALL, BIG), device_flag="1")
    assert choice.gpu == SMALL and choice.index_in_visible == 1 and choice.pin_uuid == SMALL.uuid
    # PCI order: device 1 is the big one.
    assert select_gpu(facts(SMALL, BIG, order="PCI_BUS_ID"), device_flag="1").gpu == BIG


def test_visible_devices_index_and_uuid() -> None:
    assert select_gpu(facts(SMALL, BIG, visible="1")).gpu == SMALL  # index 1 in fastest-first order
    assert select_gpu(facts(SMALL, BIG, visible="1", order="PCI_BUS_ID")).gpu == BIG
    assert select_gpu(facts(SMALL, BIG, visible="GPU-aaaa")).gpu == SMALL  # a unique UUID prefix
    choice = select_gpu(facts(SMALL, BIG, visible="GPU-aaaa1111-0000,GPU-bbbb2222-0000"), device_flag="1")
    assert choice.gpu == BIG and choice.index_in_visible == 1


def test_visible_list_stops_at_the_first_invalid_entry() -> None:
    assert [g.index for g in visible_gpus((SMALL, BIG), "0,7,1", "PCI_BUS_ID")] == [0]
    choice = select_gpu(facts(SMALL, BIG, visible=""))
    assert choice.gpu is None and "hides every" in choice.reason


def test_a_flag_that_sets_cuda_visible_devices_indexes_the_whole_cuda_list() -> None:
    # Forge --gpu-device-id / ComfyUI --cuda-device write CUDA_VISIBLE_DEVICES=<id>, replacing the
    # user's own CUDA_VISIBLE_DEVICES: id 1 is CUDA's second GPU of all (fastest first), not of the visible.
    f = facts(SMALL, BIG, visible="GPU-bbbb2222-0000")
    assert select_gpu(f, device_flag="0").gpu is BIG  # A1111: cuda:0 of the visible list
    assert select_gpu(f, device_flag="1").gpu is None  # A1111: only one GPU visible
    choice = select_gpu(f, device_flag="1", flag_sets_visible=True)
    assert choice.gpu is SMALL and choice.pin_uuid == SMALL.uuid
    assert "sets CUDA_VISIBLE_DEVICES=1" in choice.reason


def test_device_flag_out_of_range_or_not_a_number() -> None:
    assert select_gpu(facts(SMALL), device_flag="2").gpu is None
    assert "not a number" in select_gpu(facts(SMALL), device_flag="cuda:0").reason


def test_lost_gpus_are_never_picked() -> None:
    lost_big = GpuFacts(index=1, uuid=BIG.uuid, name=BIG.name, lost=True)
    choice = select_gpu(facts(SMALL, lost_big))
    assert choice.gpu == SMALL and choice.pin_uuid is None  # one usable GPU: nothing to pin
    assert select_gpu(facts(lost_big)).gpu is None


def test_unknown_memory_still_selectable() -> None:
    blind = GpuFacts(index=0, uuid="GPU-cccc", name="NVIDIA GeForce GTX 1070", errors=("memory: NotSupported",))
    assert select_gpu(facts(blind)).gpu == blind


_GPU = st.builds(
    lambda i, mb, cc, lost: GpuFacts(index=i, uuid=f"GPU-{i:04d}-x", name=f"card{i}", vram_total_mb=mb,
                                     compute_capability=cc, lost=lost),
    st.integers(0, 0), st.sampled_from([None, 2048, 4096, 6144, 8192, 12288]),
    st.sampled_from([None, "6.1", "7.5", "8.6"]), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(_GPU, min_size=1, max_size=4), st.sampled_from([None, "", "0", "1", "1,0", "GPU-0001", "0,9,1"]),
       st.sampled_from([None, "PCI_BUS_ID", "FASTEST_FIRST"]), st.sampled_from([None, "0", "1", "2"]))
def test_choice_is_always_visible_usable_and_pinned_when_several(gpus, visible, order, flag) -> None:
    gpus = [replace_index(g, i) for i, g in enumerate(gpus)]
    f = facts(*gpus, visible=visible, order=order)
    choice = select_gpu(f, device_flag=flag)
    if choice.gpu is None:
        assert choice.reason
        return
    seen = visible_gpus(f.gpus, visible, order)
    assert choice.gpu in seen and not choice.gpu.lost
    assert choice.index_in_visible is not None and seen[choice.index_in_visible] == choice.gpu
    several = sum(1 for g in f.gpus if not g.lost) > 1
    assert (choice.pin_uuid == choice.gpu.uuid) if several else choice.pin_uuid is None
    if flag is None and visible is None:
        usable = [g for g in f.gpus if not g.lost]
        assert (choice.gpu.vram_total_mb or 0) == max(g.vram_total_mb or 0 for g in usable)


def replace_index(gpu: GpuFacts, i: int) -> GpuFacts:
    from dataclasses import replace

    return replace(gpu, index=i, uuid=f"GPU-{i:04d}-x", name=f"card{i}")
