"""The hook inside a stand-in A1111: registration, when it lays out, what it records, how it fails."""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lowvram.core.markers import checkpoint_key
from lowvram.core.observations import measured_road, run_failed
from lowvram.world.observation_log import load_observations
from tests.fixtures.a1111_modules import (
    VERSIONS,
    FakeP,
    SimDevice,
    hook_path,
    install_modules,
    load_hook_script,
    make_model,
)

PATCHES = hook_path()
SCRIPT = PATCHES / "scripts" / "lowvram_layout.py"

from lowvram_hook import HOOK_VERSION, host  # noqa: E402
from lowvram_hook.layout import is_ours  # noqa: E402
from lowvram_hook.observe import StepTimer, overflow_estimate  # noqa: E402
from lowvram_hook.observe import checkpoint_key as hook_checkpoint_key  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_hook():
    host.reset_for_tests()
    yield
    host.reset_for_tests()


def write_config(path: Path, obs: Path, **over) -> Path:
    cfg = {"schema": 1, "enabled": True, "layout": True, "reserve_mb": 512, "observations": str(obs),
           "road": "resident", "offload": "none", "family": "sd15", "flags": ["--xformers"], "order": "ascending",
           "driver": "546.01", "tag": None}
    cfg.update(over)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def ui(tmp_path, monkeypatch):
    """Stand-in A1111 1.8 modules, a checkpoint file, a model, a config and the env pointing at it."""
    mods = install_modules(monkeypatch, "1.8")
    ckpt = tmp_path / "models" / "v1-5.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x" * 1000)
    model = make_model(ckpt)
    mods.shared.sd_model = model
    obs = tmp_path / "state" / "observations.jsonl"
    cfg = write_config(tmp_path / "hook.json", obs)
    monkeypatch.setenv("LOWVRAM_CONFIG", str(cfg))
    return types.SimpleNamespace(mods=mods, model=model, ckpt=ckpt, obs=obs, cfg=cfg, tmp=tmp_path)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Script:
    """What scripts/lowvram_layout.py's LowvramLayout does, around a Hook built for the tests."""

    def __init__(self, hook: host.Hook) -> None:
        self.hook = hook

    def process(self, p, *args) -> None:
        self.hook.process(p)

    def postprocess(self, p, processed, *args) -> None:
        self.hook.postprocess(p, processed)


def sim_hook(ui, dev: SimDevice | None = None, clock: Clock | None = None) -> tuple[host.Hook, SimDevice, types.SimpleNamespace]:
    """A hook on a simulated card, registered in the stand-in UI as install() registers it."""
    dev = dev or SimDevice()
    dev.put_module(ui.model)
    cuda = types.SimpleNamespace(empty_cache=lambda: None, ipc_collect=lambda: None)
    hook = host.Hook(torch_module=torch, shared=ui.mods.shared, devices=ui.mods.devices, cuda_namespace=cuda,
                     mover=dev, clock=clock or Clock(), wall=lambda: 1700000000.0,
                     scan=False)  # the gc scan is test_layout.py's subject; the model is all there is here
    host.register(ui.mods.script_callbacks, hook)
    ui.mods.scripts.alwayson_scripts[:] = [Script(hook)]
    ui.mods.shared.mem_mon.reset_peak_memory_stats = dev.reset_peaks  # memmon resets the card's peaks
    return hook, dev, cuda


def unet(clock: Clock | None, step_s: float = 0.5, *, fail_at: int | None = None,
         fail: Callable[[], BaseException] | None = None, hires_factor: float = 1.0) -> None:
    """What each denoiser call costs on the clock (`hires_factor` times more on a larger latent than the
    job's first pass), and which call fails."""
    from modules import processing

    calls = 0

    def work(denoiser, x) -> None:
        nonlocal calls
        if fail_at is not None and calls == fail_at:
            raise (fail or (lambda: RuntimeError("injected failure in the UNet")))()
        calls += 1
        if clock is not None:
            p = denoiser.p
            larger = x.shape[-1] > p.width // 8
            clock.t += step_s * (hires_factor if larger else 1.0)

    processing.unet_work = work


def generate(hook: host.Hook, p: FakeP, clock: Clock | None = None, step_s: float = 0.5, *, api: bool = False,
             **failure) -> object:
    """One job the way A1111 1.8 runs it (txt2img.py's `with closing(p)` around process_images): from
    the UI (memory monitor on, error caught) or the API (error raised)."""
    from modules import txt2img

    unet(clock, step_s, **failure)
    return txt2img.text2imgapi(p) if api else txt2img.txt2img(p)


# -- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_the_script_registers_with_both_callback_signatures(version, tmp_path, monkeypatch) -> None:
    mods = install_modules(monkeypatch, version)
    monkeypatch.setenv("LOWVRAM_CONFIG", str(write_config(tmp_path / "hook.json", tmp_path / "obs.jsonl")))
    module = load_hook_script(SCRIPT)
    cbs = mods.script_callbacks.callback_map
    assert len(cbs["callbacks_model_loaded"]) == 1
    assert len(cbs["callbacks_cfg_denoiser"]) == 1
    assert len(cbs["callbacks_cfg_after_cfg"]) == 1
    if version == "1.10":
        assert cbs["callbacks_model_loaded"][0].name == "lowvram_layout_model_loaded"
    assert issubclass(module.LowvramLayout, mods.scripts.Script)
    assert module.LowvramLayout().show(False) is mods.scripts.AlwaysVisible


def test_accepts_name_reads_the_signature() -> None:
    def v18(callback):
        return None

    def v110(callback, *, name=None):
        return None

    assert not host.accepts_name(v18)
    assert host.accepts_name(v110)


@pytest.mark.parametrize("env", [{}, {"LOWVRAM_HOOK": "off"}])
def test_without_config_or_with_hook_off_nothing_is_registered(env, tmp_path, monkeypatch, capsys) -> None:
    mods = install_modules(monkeypatch, "1.10")
    if env:
        monkeypatch.setenv("LOWVRAM_CONFIG", str(write_config(tmp_path / "hook.json", tmp_path / "o.jsonl")))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    module = load_hook_script(SCRIPT)
    assert module.HOOK is None and not hasattr(module, "LowvramLayout")
    assert all(not v for v in mods.script_callbacks.callback_map.values())
    assert "hook off" in capsys.readouterr().err


def test_a_host_without_a1111_modules_disables_the_hook_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "modules", None)  # `import modules.x` now fails
    monkeypatch.setenv("LOWVRAM_CONFIG", str(write_config(tmp_path / "hook.json", tmp_path / "o.jsonl")))
    module = load_hook_script(SCRIPT)
    assert module.HOOK is None
    err = capsys.readouterr().err
    assert "hook off" in err and "Traceback" not in err


# -- the hook in a UI without CUDA (this machine) ------------------------------------------------


def test_the_hook_survives_a_whole_session_without_cuda(ui, capsys) -> None:
    module = load_hook_script(SCRIPT)
    sc, scripts = ui.mods.script_callbacks, ui.mods.scripts
    scripts.alwayson_scripts[:] = [module.LowvramLayout()]
    sc.model_loaded_callback(ui.model)
    for _ in range(2):
        p = FakeP(sd_model=ui.model)
        assert generate(module.HOOK, p, None) is not None
        assert p.closed == 1 and "close" not in vars(p)
    err = capsys.readouterr().err
    assert "Error" not in err and "Traceback" not in err
    assert "CUDA is not available" in err  # said once, not per job
    assert err.count("CUDA is not available") == 1
    loaded = load_observations(ui.obs)
    assert loaded.warnings == ()
    assert len(loaded.items) == 2
    first = loaded.items[0]
    assert first.source == "hook" and first.layout is False and first.reserve_mb is None
    assert first.layout_error == "CUDA is not available" and first.device == "cpu"
    assert run_failed(first) and measured_road(first) is None, "a resident plan the hook refused is no resident run"
    assert first.images == 1 and first.wall_s is not None and first.ok
    assert first.checkpoint == checkpoint_key(ui.ckpt.name, ui.ckpt.stat().st_size, ui.ckpt.stat().st_mtime)
    assert (first.width, first.height, first.steps, first.batch) == (512, 512, 4, 1)
    assert first.sit is not None and first.sit >= 0
    assert first.flags == ("--xformers",) and first.driver == "546.01"
    assert not is_ours(torch.cuda.empty_cache)


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"schema": 2, "observations": "/x"}),
                                     json.dumps({"schema": 1, "observations": "relative/path"}),
                                     json.dumps({"schema": 1, "observations": "/abs", "reserve_mb": "a lot"})])
def test_a_broken_config_leaves_the_ui_working(ui, content, capsys) -> None:
    ui.cfg.write_text(content)
    hook, dev, _ = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.events == []  # nothing moved
    assert not ui.obs.exists()
    err = capsys.readouterr().err
    assert err.count("doing nothing") == 1 and "Traceback" not in err


def test_a_missing_config_file_does_nothing(ui, capsys) -> None:
    ui.cfg.unlink()
    hook, dev, _ = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.events == [] and not ui.obs.exists()
    assert "does not exist" in capsys.readouterr().err


# -- when the layout runs -----------------------------------------------------------------------


def test_the_callback_only_marks_the_layout_pending_and_the_next_job_runs_it(ui) -> None:
    clock = Clock()
    hook, dev, cuda = sim_hook(ui, clock=clock)
    hook.on_model_loaded(ui.model)
    assert "to_host" not in dev.kinds(), "no layout inside the callback (it may race the first job)"
    assert hook.pending
    generate(hook, FakeP(sd_model=ui.model), clock)
    assert "alloc_reserve" in dev.kinds() and is_ours(cuda.empty_cache)
    n_events = len(dev.events)
    generate(hook, FakeP(sd_model=ui.model), clock)
    assert "to_host" not in dev.kinds()[n_events:], "same model, same reserve: no second layout"
    rec = load_observations(ui.obs).items
    assert [o.layout for o in rec] == [True, True]
    assert rec[0].reserve_mb == 512 and rec[0].layout_s is not None and rec[1].layout_s is None
    # free = what was free with the model resident, before the reserve (not shrunk by the reserve later)
    assert rec[0].free_mb == rec[1].free_mb == ((8192 - 300 << 20) - sum(dev.on_gpu.values())) >> 20
    assert rec[0].sit == pytest.approx(0.5)
    assert rec[0].road == "resident" and rec[0].family == "sd15"


def test_a_cached_checkpoint_switch_without_callback_is_noticed(ui) -> None:
    hook, dev, _ = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    other = make_model(ui.ckpt, seed=1)
    dev.put_module(other)
    ui.mods.shared.sd_model = other
    before = len(dev.events)
    generate(hook, FakeP(sd_model=other))  # no on_model_loaded: A1111 had it cached
    assert "to_host" in dev.kinds()[before:]
    assert all(dev.holds(p) for p in other.parameters())


def test_a_new_reserve_in_the_config_lays_out_again_and_layout_false_undoes_it(ui) -> None:
    hook, dev, cuda = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    write_config(ui.cfg, ui.obs, reserve_mb=1024)
    before = len(dev.events)
    generate(hook, FakeP(sd_model=ui.model))
    assert ("alloc_reserve", 1024 << 20) in dev.events[before:]
    write_config(ui.cfg, ui.obs, layout=False, road="swap")
    generate(hook, FakeP(sd_model=ui.model))
    assert not is_ours(cuda.empty_cache), "layout off: the patch is lifted so torch_gc releases the reserve"
    assert dev.cached_free == 0
    last = load_observations(ui.obs).items[-1]
    assert last.layout is False and last.reserve_mb is None and last.road == "swap"


def test_turning_model_first_off_in_the_config_lays_out_again(ui) -> None:
    hook, dev, _cuda = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    before = dev.kinds().count("to_host")
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.kinds().count("to_host") == before, "same config: no new layout"
    write_config(ui.cfg, ui.obs, model_first=False)
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.kinds().count("to_host") > before, "model_first changed: laid out again"


def test_a_ui_reload_lifts_the_patch_before_extensions_are_imported_again(ui) -> None:
    """giant-kitten saves torch.cuda.empty_cache at import: after a reload it must save the real one."""
    hook, dev, cuda = sim_hook(ui)
    real = cuda.empty_cache
    assert ui.mods.script_callbacks.callback_map["callbacks_script_unloaded"], "registered by sim_hook as by install()"
    generate(hook, FakeP(sd_model=ui.model))
    assert is_ours(cuda.empty_cache)
    ui.mods.script_callbacks.script_unloaded_callback()  # A1111 runs it before re-importing scripts
    assert cuda.empty_cache is real, "lifted, so an extension imported now saves the real function"
    before = len(dev.events)
    generate(hook, FakeP(sd_model=ui.model))  # same model, same reserve: laid out again all the same
    assert "alloc_reserve" in dev.kinds()[before:] and is_ours(cuda.empty_cache)


def test_medvram_is_refused_and_recorded_without_a_reserve(ui, capsys) -> None:
    ui.model.lowvram = True
    hook, dev, cuda = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.events == [] and not is_ours(cuda.empty_cache)
    assert "medvram" in capsys.readouterr().err
    obs = load_observations(ui.obs).items[0]
    assert obs.layout is False and obs.reserve_mb is None
    assert obs.layout_error is not None and "medvram" in obs.layout_error
    assert obs.ok and run_failed(obs) and measured_road(obs) is None


def test_a_failed_layout_is_rolled_back_and_the_job_still_recorded(ui, capsys) -> None:
    hook, dev, cuda = sim_hook(ui, SimDevice(fail_on=("to_device", 2)))
    generate(hook, FakeP(sd_model=ui.model))
    assert all(dev.holds(p) for p in ui.model.parameters())
    assert not is_ours(cuda.empty_cache)
    assert "rolled back" in capsys.readouterr().err
    obs = load_observations(ui.obs).items[0]
    assert obs.layout is False
    assert obs.layout_error is not None and "injected failure on to_device" in obs.layout_error
    assert run_failed(obs) and measured_road(obs) is None


def test_a_failed_layout_is_not_retried_at_every_job_until_the_model_or_reserve_changes(ui, capsys) -> None:
    """Each try copies the whole model out and back: a layout that cannot succeed (say the reserve
    and the model do not both fit) must not cost that at every job."""
    hook, dev, _ = sim_hook(ui, SimDevice(fail_on=("to_device", 2)))
    generate(hook, FakeP(sd_model=ui.model))
    tries = dev.kinds().count("to_host")
    assert tries and "rolled back" in capsys.readouterr().err
    generate(hook, FakeP(sd_model=ui.model))
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.kinds().count("to_host") == tries, "same model, same reserve: not tried again"
    write_config(ui.cfg, ui.obs, reserve_mb=256)
    generate(hook, FakeP(sd_model=ui.model))
    assert dev.kinds().count("to_host") > tries, "a new reserve is worth a new try"
    assert hook.laid_out == (256, "ascending", True)
    assert all(dev.holds(p) for p in ui.model.parameters())
    errors = [o.layout_error for o in load_observations(ui.obs).items]
    assert errors[:3] == [errors[0]] * 3 and errors[0], "a layout not retried is still not in force"
    assert errors[3] is None


def oom(dev: SimDevice, peak_mb: int = 7000) -> Callable[[], BaseException]:
    """A CUDA OOM as the allocator has it: the peak reached, num_ooms counted, the error raised."""

    def fail() -> BaseException:
        dev.peak_reserved = max(dev.peak_reserved, peak_mb << 20)
        dev.ooms += 1
        return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return fail


def test_an_oom_on_a_host_without_close_is_recorded_at_the_next_job(ui) -> None:
    """Hosts that do not run the job in `with closing(p)`: the allocator's num_ooms at the next job."""
    from modules import processing

    hook, dev, _ = sim_hook(ui)
    unet(None, fail_at=1, fail=oom(dev))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        processing.process_images(FakeP(sd_model=ui.model, width=1024, height=1024))
    assert not ui.obs.exists(), "nothing closed the job"
    generate(hook, FakeP(sd_model=ui.model))
    items = load_observations(ui.obs).items
    assert len(items) == 2
    failed = items[0]
    assert failed.ok is False and failed.ooms == 1 and failed.width == 1024
    assert "out of memory" in failed.reason
    assert failed.peak_reserved_mb is None, "the next job reset the peaks: none rather than the wrong ones"
    assert items[1].ok is True


def test_an_oom_is_recorded_against_the_checkpoint_that_ran_out_of_memory(ui) -> None:
    """After an OOM users switch to a smaller checkpoint; the failed job's record must still name the
    model that failed (the ladder steps down for that one)."""
    hook, dev, _ = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model, width=1024, height=1024), fail_at=0, fail=oom(dev))
    small = ui.tmp / "models" / "small-sdxl.safetensors"
    small.write_bytes(b"y" * 10)
    other = make_model(small, sdxl=True, seed=2)
    dev.put_module(other)
    ui.mods.shared.sd_model = other
    generate(hook, FakeP(sd_model=other))
    failed, ok = load_observations(ui.obs).items
    assert failed.ok is False
    assert failed.checkpoint == checkpoint_key(ui.ckpt.name, ui.ckpt.stat().st_size, ui.ckpt.stat().st_mtime)
    assert failed.family == "sd15"
    assert ok.checkpoint is not None and ok.checkpoint.startswith("small-sdxl.safetensors|") and ok.family == "sdxl"


# -- a job that fails (issue 13 §1, §3) ------------------------------------------------------------


@pytest.mark.parametrize("api", [False, True], ids=["ui", "api"])
def test_a_job_that_fails_for_any_reason_is_recorded_at_its_close_with_the_reason(ui, api) -> None:
    """Not only an OOM: A1111 1.8 closes p right after the failure (`with closing(p)`), postprocess never
    comes; the record is written then, with the exception in flight, and p.close is put back."""
    from modules import txt2img

    hook, _dev, _ = sim_hook(ui)
    p = FakeP(sd_model=ui.model)
    if api:
        with pytest.raises(RuntimeError, match="injected failure"):
            generate(hook, p, api=True, fail_at=2)
    else:
        assert generate(hook, p, fail_at=2) is None
        assert txt2img.last_error == "RuntimeError: injected failure in the UNet", "the UI shows it, goes on"
    items = load_observations(ui.obs).items
    assert len(items) == 1, "recorded at the close, not left for a next job that may never come"
    failed = items[0]
    assert failed.ok is False and failed.ooms == 0 and run_failed(failed)
    assert failed.reason == "RuntimeError: injected failure in the UNet"
    assert p.closed == 1 and "close" not in vars(p), "the real close ran once and the class's is back"
    generate(hook, p)  # the same p again (a loopback script): recorded once, ok
    assert [o.ok for o in load_observations(ui.obs).items] == [False, True]
    assert p.closed == 2


def test_an_oom_record_carries_the_failed_jobs_own_peaks(ui) -> None:
    """A1111's memory monitor resets the peak stats when the next UI job starts (and so does the hook):
    the failed job's peaks are read at its close, before that."""
    hook, dev, _ = sim_hook(ui, SimDevice(total_mb=8192))
    generate(hook, FakeP(sd_model=ui.model, width=1024, height=1024), fail_at=1, fail=oom(dev, 7000))
    generate(hook, FakeP(sd_model=ui.model))  # memmon resets the peaks first
    failed, ok = load_observations(ui.obs).items
    assert failed.peak_reserved_mb == 7000, "the failed job's own peak, not the next job's"
    assert failed.ok is False and failed.ooms == 1 and failed.width == 1024
    assert failed.reason.startswith("out of memory (OOM): OutOfMemoryError: CUDA out of memory")
    assert failed.overflow_source == "estimate" and failed.overflow_mb is not None
    assert ok.ok and ok.peak_reserved_mb is not None and ok.peak_reserved_mb < 7000


def test_a_close_that_an_extension_wrapped_first_is_chained_and_put_back(ui) -> None:
    hook, _dev, _ = sim_hook(ui)
    p = FakeP(sd_model=ui.model)
    seen = []
    theirs = p.close

    def their_close() -> None:
        seen.append("theirs")
        theirs()

    p.close = their_close  # type: ignore[method-assign]
    generate(hook, p, fail_at=0)
    assert seen == ["theirs"] and p.closed == 1 and p.close is their_close
    assert load_observations(ui.obs).items[0].ok is False


def test_a_failure_inside_the_close_wrapper_never_stops_the_real_close(ui, monkeypatch, capsys) -> None:
    hook, _dev, _ = sim_hook(ui)

    def boom(*_a, **_k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(hook, "_record", boom)
    p = FakeP(sd_model=ui.model)
    with pytest.raises(RuntimeError, match="injected failure"):  # the job's own error, not the hook's
        generate(hook, p, api=True, fail_at=0)
    assert p.closed == 1 and "close" not in vars(p)
    assert "kaboom" in capsys.readouterr().err


def test_a_job_without_exception_that_skipped_postprocess_is_recorded_as_not_finished(ui) -> None:
    hook, _dev, _ = sim_hook(ui)
    p = FakeP(sd_model=ui.model)
    hook.process(p)
    p.close()
    obs = load_observations(ui.obs).items[0]
    assert obs.ok is False and "without reaching postprocess" in obs.reason


# -- what a record measures (issue 13 §3) -----------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_seconds_per_iteration_is_exact_for_any_number_of_steps(ui, steps) -> None:
    """1.8's sampling_step lags (0, 0, 1, …): counted in denoiser calls, a 2-step job has an s/it and
    a 3-step job's is not doubled."""
    clock = Clock()
    hook, _dev, _ = sim_hook(ui, clock=clock)
    generate(hook, FakeP(sd_model=ui.model, steps=steps), clock, step_s=0.5)
    assert load_observations(ui.obs).items[0].sit == pytest.approx(0.5)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_a_second_order_sampler_counts_steps_not_calls(ui, steps) -> None:
    """Heun calls the denoiser twice a step (total_steps = 2 × steps), once on the last step."""
    clock = Clock()
    hook, _dev, _ = sim_hook(ui, clock=clock)
    generate(hook, FakeP(sd_model=ui.model, steps=steps, sampler_name="Heun"), clock, step_s=0.25)
    calls = 2 * steps - 1
    assert load_observations(ui.obs).items[0].sit == pytest.approx(0.25 * calls / steps)


def test_hires_fix_and_n_iter_passes_are_told_apart(ui) -> None:
    """Every batch and hires fix's second pass is a new sampler; the record's s/it is the first pass's
    (the record's size), not the 4× slower larger pass's."""
    from modules import txt2img

    clock = Clock()
    hook, _dev, _ = sim_hook(ui, clock=clock)
    p = FakeP(sd_model=ui.model, steps=2, n_iter=3, enable_hr=True, hr_second_pass_steps=3)
    unet(clock, 0.5, hires_factor=4.0)
    txt2img.txt2img(p)
    obs = load_observations(ui.obs).items[0]
    assert obs.sit == pytest.approx(0.5)
    assert len(hook.steps.passes) == 6


def test_without_params_denoiser_calls_are_counted(ui, monkeypatch) -> None:
    """An older or other UI: no `denoiser` in the params, no on_cfg_after_cfg; s/it from the calls."""
    sc = ui.mods.script_callbacks
    monkeypatch.setattr(ui.mods.processing, "CFGDenoiserParams", lambda *a: sc.CFGDenoiserParams(*a[:7]))
    monkeypatch.delattr(sc, "on_cfg_after_cfg")
    clock = Clock()
    hook, _dev, _ = sim_hook(ui, clock=clock)
    assert not sc.callback_map["callbacks_cfg_after_cfg"]
    generate(hook, FakeP(sd_model=ui.model, steps=3, n_iter=2), clock, step_s=0.5)
    assert load_observations(ui.obs).items[0].sit == pytest.approx(0.5)
    assert len(hook.steps.passes) == 2, "sampling_step went back to 0: a new batch"


def test_a_record_has_the_per_image_wall_time_the_image_count_and_the_device(ui) -> None:
    """wall_s: the whole job over its images, so --medvram's per-image model moves count; device: what
    the UI generates on (A1111's devices.device)."""
    clock = Clock()
    hook, _dev, _ = sim_hook(ui, clock=clock)
    ui.mods.devices.device = torch.device("cuda")
    generate(hook, FakeP(sd_model=ui.model, steps=2, batch_size=2, n_iter=3), clock, step_s=0.5)
    obs = load_observations(ui.obs).items[0]
    assert obs.images == 6 and obs.wall_s == pytest.approx(3 * 2 * 0.5 / 6)
    assert obs.device == "cuda" and obs.sit == pytest.approx(0.5)
    ui.mods.devices.device = torch.device("cpu")  # --use-cpu all
    generate(hook, FakeP(sd_model=ui.model), clock)
    assert load_observations(ui.obs).items[1].device == "cpu"
    del ui.mods.devices.device  # a host without modules.devices.device: the mover says
    generate(hook, FakeP(sd_model=ui.model), clock)
    assert load_observations(ui.obs).items[2].device == "cuda"
    raw = json.loads(ui.obs.read_text().splitlines()[0])
    assert raw["hook_version"] == HOOK_VERSION != "1"


def test_overflow_is_estimated_from_peak_reserved_and_non_torch_use(ui) -> None:
    dev = SimDevice(total_mb=1024, other_mb=100)
    hook, dev, _ = sim_hook(ui, dev)
    hook.process(FakeP(sd_model=ui.model))
    dev.peak_reserved = 1200 << 20  # the job grew past the card
    hook.postprocess(FakeP(sd_model=ui.model), None)
    obs = load_observations(ui.obs).items[0]
    assert obs.overflow_source == "estimate"
    assert obs.overflow_mb is not None and obs.overflow_mb >= 1200 + 100 - 1024 - 1
    assert obs.vram_total_mb == 1024 and obs.peak_reserved_mb == 1200


def test_an_exception_inside_the_hook_is_logged_not_raised(ui, capsys, monkeypatch) -> None:
    hook, _, _ = sim_hook(ui)

    def boom(*_a, **_k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(hook, "_start_job", boom)
    hook.process(FakeP(sd_model=ui.model))  # must not raise
    hook.postprocess(FakeP(sd_model=ui.model), None)
    assert "kaboom" in capsys.readouterr().err


def test_an_unwritable_observations_file_is_said_once(ui, capsys) -> None:
    write_config(ui.cfg, ui.tmp / "a-file" / "obs.jsonl")
    (ui.tmp / "a-file").write_text("not a directory")
    hook, _, _ = sim_hook(ui)
    generate(hook, FakeP(sd_model=ui.model))
    generate(hook, FakeP(sd_model=ui.model))
    assert capsys.readouterr().err.count("cannot record") == 1


# -- small parts ----------------------------------------------------------------------------------


def test_step_timer_splits_passes_by_denoiser_or_by_a_restarted_counter() -> None:
    timer = StepTimer()
    first, second = types.SimpleNamespace(steps=2, total_steps=2), types.SimpleNamespace(steps=2, total_steps=2)
    for denoiser, t0 in ((first, 0.0), (second, 10.0)):
        for i in range(2):
            denoiser.step = i
            timer.call(t0 + i, denoiser=denoiser)
            timer.call_ended(t0 + i + (1 if denoiser is first else 4))
    first.step = 0  # the same denoiser initialised again
    timer.call(20.0, denoiser=first)
    assert len(timer.passes) == 3
    assert [p.seconds_per_step() for p in timer.passes] == [1.0, 2.5, None]
    assert timer.seconds_per_iteration(first_pass_only=True) == pytest.approx(1.0)
    assert timer.seconds_per_iteration() == pytest.approx(1.75)
    assert StepTimer().seconds_per_iteration() is None


def test_step_timer_without_a_denoiser_splits_passes_when_sampling_step_goes_down() -> None:
    timer = StepTimer()
    for step, t in [(0, 0.0), (0, 1.0), (1, 2.0), (2, 3.0), (0, 10.0), (0, 12.0), (1, 14.0)]:
        timer.call(t, sampling_step=step, total_steps=4)
    assert len(timer.passes) == 2
    assert timer.seconds_per_iteration() == pytest.approx(1.5)  # median of 1.0 and 2.0


def test_overflow_estimate() -> None:
    assert overflow_estimate(peak_reserved=7000, non_torch=500, total=8000) == 0
    assert overflow_estimate(peak_reserved=8000, non_torch=500, total=8000) == 500
    assert overflow_estimate(peak_reserved=8000, non_torch=-300, total=8000) == 0


def test_the_hook_checkpoint_key_is_lowvrams(tmp_path) -> None:
    f = tmp_path / "sd_xl_base_1.0.safetensors"
    f.write_bytes(b"abc")
    st = f.stat()
    assert hook_checkpoint_key(str(f)) == checkpoint_key(f.name, st.st_size, st.st_mtime)
    assert hook_checkpoint_key(str(tmp_path / "missing")) is None
