"""NVML detection against the fake NVML: each scenario, each partial failure."""

from __future__ import annotations

import pynvml
import pytest

from lowvram.world.detect import nvml
from tests.fixtures import fake_nvml


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def install(fake: fake_nvml.FakeNvml) -> fake_nvml.FakeNvml:
        monkeypatch.setattr(nvml, "pynvml", fake)
        return fake

    return install


def test_no_driver_is_an_answer_not_a_crash(use) -> None:
    fake = use(fake_nvml.no_driver())
    gpus, why = nvml.probe_gpus()
    assert gpus == ()
    assert why == "NVIDIA driver not found (NVML library missing)"
    assert fake.shutdown_calls == 0  # nothing to shut down after a failed init


def test_driver_not_loaded_says_so(use) -> None:
    use(fake_nvml.driver_not_loaded())
    gpus, why = nvml.probe_gpus()
    assert gpus == ()
    assert why is not None and "not loaded" in why


@pytest.mark.parametrize(
    ("scenario", "name", "total", "cc", "driver", "cuda"),
    [
        ("gtx1050ti", "NVIDIA GeForce GTX 1050 Ti", 4096, "6.1", "535.183.01", "12.2"),
        ("gtx1070", "NVIDIA GeForce GTX 1070", 8192, "6.1", "546.01", "12.3"),
        ("gtx1660", "NVIDIA GeForce GTX 1660", 6144, "7.5", "550.54.14", "12.4"),
        ("rtx3060", "NVIDIA GeForce RTX 3060", 12288, "8.6", "560.35.03", "12.6"),
    ],
)
def test_single_cards_read_every_field(use, scenario, name, total, cc, driver, cuda) -> None:
    fake = use(fake_nvml.SCENARIOS[scenario]())
    gpus, why = nvml.probe_gpus()
    assert why is None
    (gpu,) = gpus
    assert gpu.index == 0
    assert gpu.name == name
    assert gpu.vram_total_mb == total
    assert gpu.vram_free_mb is not None and gpu.vram_used_mb == total - gpu.vram_free_mb
    assert gpu.compute_capability == cc
    assert gpu.driver == driver and gpu.cuda_driver == cuda
    assert gpu.uuid is not None and gpu.uuid.startswith("GPU-")
    assert gpu.pcie_gen in (3, 4) and gpu.pcie_width == 16
    assert not gpu.lost and gpu.errors == ()
    assert fake.init_calls == 1 and fake.shutdown_calls == 1 and not fake.initialised


def test_two_gpus_come_in_nvml_order(use) -> None:
    use(fake_nvml.two_gpus())
    gpus, _ = nvml.probe_gpus()
    assert [g.index for g in gpus] == [0, 1]
    assert [g.vram_total_mb for g in gpus] == [4096, 12288]


def test_memory_not_supported_loses_only_memory(use) -> None:
    use(fake_nvml.memory_not_supported())
    (gpu,), why = nvml.probe_gpus()
    assert why is None
    assert gpu.vram_total_mb is None and gpu.vram_free_mb is None
    assert gpu.name == "NVIDIA GeForce GTX 1070" and gpu.compute_capability == "6.1"
    assert gpu.errors == ("memory: NotSupported",)
    assert not gpu.lost


def test_lost_gpu_is_marked_and_the_other_survives(use) -> None:
    use(fake_nvml.lost_gpu())
    gpus, _ = nvml.probe_gpus()
    good, lost = gpus
    assert not good.lost and good.vram_total_mb == 8192
    assert lost.lost and lost.name == "NVIDIA GeForce RTX 3060"
    assert lost.compute_capability is None  # reading stopped at the loss
    assert "memory: GpuIsLost" in lost.errors


def test_old_driver_function_not_found_falls_back(use) -> None:
    use(fake_nvml.function_not_found())
    (gpu,), _ = nvml.probe_gpus()
    assert gpu.vram_total_mb == 8192  # memory v1 after v2 was missing
    assert gpu.cuda_driver is None and gpu.driver == "470.256.02"
    assert gpu.pcie_gen is None and gpu.pcie_width is None
    assert set(gpu.errors) == {"pcie_gen: FunctionNotFound", "pcie_width: FunctionNotFound",
                               "cuda_cores: FunctionNotFound"}
    assert gpu.cuda_cores is None and gpu.pcie_gen_max == 3 and gpu.sm_clock_max_mhz == 1911


def test_bytes_names_are_decoded(use) -> None:
    use(fake_nvml.FakeNvml([fake_nvml.gtx1070_gpu(name_as_bytes=True)]))
    (gpu,), _ = nvml.probe_gpus()
    assert gpu.name == "NVIDIA GeForce GTX 1070"


def test_zero_gpus_and_count_failure(use) -> None:
    use(fake_nvml.FakeNvml([]))
    assert nvml.probe_gpus() == ((), "the NVIDIA driver sees no GPU")
    use(fake_nvml.FakeNvml([fake_nvml.gtx1070_gpu()], system_fail={"nvmlDeviceGetCount": pynvml.NVMLError_Unknown}))
    gpus, why = nvml.probe_gpus()
    assert gpus == () and why is not None and "Unknown" in why


def test_unknown_error_on_one_field(use) -> None:
    use(fake_nvml.FakeNvml([fake_nvml.rtx3060_gpu(fail={"nvmlDeviceGetUUID": pynvml.NVMLError_Unknown})]))
    (gpu,), _ = nvml.probe_gpus()
    assert gpu.uuid is None and gpu.errors == ("uuid: Unknown",)
    assert gpu.vram_total_mb == 12288


def test_cuda_version_text() -> None:
    assert nvml.cuda_version_text(12030) == "12.3"
    assert nvml.cuda_version_text(11080) == "11.8"
    assert nvml.cuda_version_text(13000) == "13.0"


@pytest.mark.gpu
def test_real_nvml_when_a_gpu_is_here() -> None:
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pytest.skip("no NVIDIA driver here")
    gpus, why = nvml.probe_gpus()
    assert why is None and gpus
    assert all(g.vram_total_mb for g in gpus)


def test_a_gpu_without_a_handle_is_not_called_lost_off_the_bus(use) -> None:
    """NoPermission on one GPU's handle (a container given only some /dev/nvidia*): that GPU is unusable, the other
    is read, and doctor does not tell the user to reboot for a GPU that never fell off the bus."""
    from lowvram.core.facts import Facts, SystemFacts
    from lowvram.world.diagnosis import check_gpu

    use(fake_nvml.FakeNvml([fake_nvml.gtx1070_gpu(),
                            fake_nvml.rtx3060_gpu(fail={"nvmlDeviceGetHandleByIndex": pynvml.NVMLError_NoPermission})]))
    gpus, why = nvml.probe_gpus()
    assert why is None and not gpus[0].lost and gpus[0].vram_total_mb == 8192
    assert gpus[1].lost and gpus[1].errors == ("handle: NoPermission",)
    check = check_gpu(Facts(system=SystemFacts(os="linux"), gpus=gpus))
    assert check.status == "warn" and "GTX 1070" in check.message
    assert "fell off the bus" not in check.message and "reboot" not in check.hint
    assert "NoPermission" in check.message and "/dev/nvidia" in check.hint


def test_a_field_the_binding_cannot_decode_loses_only_that_field(use) -> None:
    """nvidia-ml-py decodes names itself; bytes it cannot decode raise UnicodeDecodeError, not an NVMLError."""
    fake = fake_nvml.FakeNvml([fake_nvml.rtx3060_gpu(fail={"nvmlDeviceGetName": _undecodable})])
    use(fake)
    (gpu,), why = nvml.probe_gpus()
    assert why is None and gpu.name is None and gpu.vram_total_mb == 12288
    assert gpu.errors == ("name: UnicodeDecodeError",)


def _undecodable() -> UnicodeDecodeError:
    return UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


@pytest.mark.parametrize(
    ("scenario", "cores", "clock", "link_max"),
    [
        ("gtx1050ti", 768, 1911, (3, 16)),
        ("gtx1070", 1920, 1911, (3, 16)),
        ("gtx1660", 1408, 2100, (3, 16)),
        ("rtx3060", 3584, 2100, (4, 16)),
    ],
)
def test_speed_facts_are_read(use, scenario, cores, clock, link_max) -> None:
    use(fake_nvml.SCENARIOS[scenario]())
    (gpu,), _ = nvml.probe_gpus()
    assert gpu.cuda_cores == cores and gpu.sm_clock_max_mhz == clock
    assert (gpu.pcie_gen_max, gpu.pcie_width_max) == link_max
    assert gpu.errors == ()


def test_an_idle_link_keeps_its_maximum(use) -> None:
    """The current link of an idle card is Gen 1; the bandwidth a streaming model gets is the maximum's."""
    use(fake_nvml.idle_link())
    (gpu,), _ = nvml.probe_gpus()
    assert (gpu.pcie_gen, gpu.pcie_width) == (1, 16)
    assert (gpu.pcie_gen_max, gpu.pcie_width_max) == (4, 16)


def test_speed_facts_not_supported_are_null_with_errors(use) -> None:
    use(fake_nvml.speed_not_supported())
    (gpu,), _ = nvml.probe_gpus()
    assert gpu.cuda_cores is None and gpu.sm_clock_max_mhz is None
    assert gpu.pcie_gen_max == 3 and gpu.vram_total_mb == 8192
    assert set(gpu.errors) == {"cuda_cores: NotSupported", "sm_clock_max_mhz: NotSupported"}
