"""benchmarks/gpu_layout.py, the parts a CPU can check: arguments, the UNet-size parameter trees,
checksums, the tables, the estimate subprocess, the one-line exit without CUDA, and a dry run of
the real layout on the simulated device. (The GPU figures themselves need a CUDA machine.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def g() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_layout", REPO / "benchmarks" / "gpu_layout.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_layout"] = module
    spec.loader.exec_module(module)
    return module


def test_arguments_have_modest_defaults_and_reject_nonsense(g: Any) -> None:
    args = g.parse_args([])
    assert args.families == ["sd15", "sdxl"]
    assert args.runs == 3 and args.reserves == [0, 512, 1024] and args.scale == 1.0
    assert args.cap_mb == {"sd15": 6144, "sdxl": 8192}
    dry = g.parse_args(["--dry-run", "--cap-mb", "sdxl=6144", "--reserves", "256", "--families", "sdxl"])
    assert dry.runs == 1 and dry.scale == 0.02 and dry.cap_mb == {"sd15": 6144, "sdxl": 6144}
    assert dry.reserves == [256] and dry.families == ["sdxl"]
    for bad in (["--families", "sd3"], ["--cap-mb", "sd3=1"], ["--cap-mb", "sd15=lots"], ["--runs", "0"]):
        with pytest.raises(SystemExit):
            g.parse_args(bad)


@pytest.mark.parametrize(("family", "tensors"), [("sd15", 686), ("sdxl", 1680)])
def test_the_parameter_trees_have_the_real_unets_size_and_mix(g: Any, family: str, tensors: int) -> None:
    shapes = g.unet_shapes(family)
    params, count = g.count_params(shapes)
    assert (params, count) == (g.EXPECTED_PARAMS[family], tensors)  # ldm/sgm UNetModel, counted on meta
    sizes = sorted(2 * torch.Size(s).numel() for block in shapes for s in block)
    small = sum(1 for b in sizes if b < 16 * 1024)
    large = sum(1 for b in sizes if b >= 16 * 1024 * 1024)
    assert small > count // 3  # norms and biases
    assert 25 <= large < count // 10  # a few big conv/linear weights
    assert g.count_params(g.vae_shapes())[0] == 83_653_863  # AutoencoderKL (ch 128, 1-2-4-4)
    assert g.count_params(g.text_shapes("sd15"))[0] == 123_060_480  # CLIP ViT-L/14 text


def test_the_fake_model_is_shaped_like_a1111s_and_checksums_see_one_bit(g: Any) -> None:
    model = g.build_fake_model("sd15", "cpu", scale=0.002)
    unet = model.model.diffusion_model
    assert sum(1 for _ in unet.parameters()) == 686
    tensors = g.model_tensors(model)
    sig = g.signature(tensors)
    assert sig[-2][4] == sig[-3][4] == sig[-1][4]  # the schedule views share one storage
    before = g.checksums(tensors, chunk=4096)
    assert torch.equal(before, g.checksums(tensors))  # chunking does not change the sums
    p = next(unet.parameters())
    with torch.no_grad():
        p.view(-1).view(torch.int16)[0] ^= 1
    assert not torch.equal(before, g.checksums(tensors))


def test_the_tables_align_and_compare(g: Any) -> None:
    text = g.format_table(["a", "bb"], [["x", 1.0], ["yyy", None]])
    assert text.splitlines() == ["a    bb", "---  --", "x     1", "yyy   -"]
    est = {"parts": {"weights_unet": 1000, "weights_text": 200, "weights_vae": 100, "vae_decode": 500, "cuda_context": 450},
           "phases": {"sampling": 1400, "vae_decode": 1800}, "torch_peak_mb": 1800, "peak_mb": 2400}
    mib = 1024 * 1024
    measured = {"resident": 1300 * mib, "sampling": {"alloc": 1500 * mib, "reserved": 1600 * mib},
                "vae_decode": {"alloc": 1800 * mib, "reserved": 2000 * mib}, "non_torch": 500 * mib}
    rows = {r["what"]: r for r in g.compare_rows(measured, est)}
    assert rows["sampling: working (peak - resident)"]["measured_mib"] == 200
    assert rows["sampling: working (peak - resident)"]["estimate_mib"] == 100
    assert rows["sampling: working (peak - resident)"]["error_pct"] == pytest.approx(-50.0)
    assert rows["card peak (max reserved + non-torch)"]["measured_mib"] == 2500
    table = g.peaks_table([{"family": "sd15", "compare": list(rows.values())}])
    assert "sd15 512²" in table and "-50.0%" in table and "+0.0%" in table


def test_without_cuda_it_says_so_in_one_line(g: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert g.main(["--families", "sd15"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--dry-run" in lines[0]


def test_a_dry_run_lays_out_for_real_and_skips_peaks_in_one_line(g: Any, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc = g.main(["--dry-run", "--families", "sd15", "--scale", "0.002", "--reserves", "0,64", "--runs", "1",
                 "--ldm-path", str(tmp_path / "nowhere"), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    (fam,) = report["layout"]
    assert fam["storages"] == 686 + 248 + 148 + 1  # UNet, VAE, text, and the three schedule views as one
    assert [r["reserve_mb"] for r in fam["rows"]] == [0, 64]
    assert all(r["ok"] and r["identical"] for r in fam["rows"]) and fam["rows"][1]["cache_kept"] is True
    assert "bit-identical" in text
    assert "peaks sd15: skipped: FileNotFoundError: no ldm code" in text
    assert report["failures"] == [] and report["peaks"] == []


def test_the_estimate_runs_as_a_subprocess(g: Any) -> None:
    est = g.run_estimate("sdxl", g.parse_args([]), 8192)
    assert est["request"]["model"] == "sdxl" and est["request"]["width"] == 1024
    assert est["request"]["attention"] == "sdp" and est["request"]["offload"] == "none"
    assert est["phases"]["vae_decode"] > est["phases"]["sampling"] > 0


def test_stage_copies_only_sources_and_configs(g: Any, tmp_path: Path) -> None:
    web = tmp_path / "webui"
    for rel in ("repositories/stable-diffusion-stability-ai/ldm/modules/a.py",
                "repositories/stable-diffusion-stability-ai/ldm/modules/big.ckpt",
                "repositories/generative-models/sgm/util.py",
                "repositories/generative-models/configs/inference/sd_xl_base.yaml",
                "configs/v1-inference.yaml"):
        (web / rel).parent.mkdir(parents=True, exist_ok=True)
        (web / rel).write_text("x")
    dest = tmp_path / "stage"
    assert g.main(["--stage", str(dest), "--webui", str(web)]) == 0
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["configs/v1-inference.yaml",
                     "repositories/generative-models/configs/inference/sd_xl_base.yaml",
                     "repositories/generative-models/sgm/util.py",
                     "repositories/stable-diffusion-stability-ai/ldm/modules/a.py"]
    assert g.resolve_paths(g.parse_args(["--webui", str(dest)]))["ldm"] == dest / "repositories" / "stable-diffusion-stability-ai"


def test_a_layout_that_cannot_start_is_one_line_and_a_failure(g: Any, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    def too_big(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore detail")

    monkeypatch.setattr(g, "build_fake_model", too_big)
    assert g.main(["--dry-run", "--families", "sdxl", "--skip-peaks"]) == 1
    out = capsys.readouterr().out
    assert "layout sdxl: failed: RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB\n" in out
    assert "FAILED: layout sdxl: failed" in out and "more detail" not in out
