"""Family, variant and format from a model file's header alone (issue 18 item 1): every family in
every format, single-file checkpoints and diffusion-model-only files, GGUF quants, damaged headers;
what doctor shows; and plan/estimate stopping with one line for a family they cannot model yet."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lowvram.core.errors import WebuiError
from lowvram.core.model_files import DETECTED_FAMILIES, gguf_info
from lowvram.world.detect import nvml
from lowvram.world.detect.checkpoint import MAX_GGUF_HEADER_BYTES, checkpoint_info
from tests.fixtures import fake_nvml
from tests.fixtures.model_headers import gguf_bytes, write_gguf, write_model, write_safetensors_model
from tests.fixtures.webui_trees import make_webui

SAFETENSORS_FORMATS = ("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "nf4", "fp4")
GGUF_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q4_k_s", "q4_k_m", "q5_k_s",
                "q5_k_m", "q6_k", "fp16", "bf16", "fp32")


@pytest.mark.parametrize("single_file", [True, False], ids=["checkpoint", "diffusion-only"])
@pytest.mark.parametrize("fmt", SAFETENSORS_FORMATS)
@pytest.mark.parametrize("family", DETECTED_FAMILIES)
def test_safetensors_family_and_format(tmp_path: Path, family: str, fmt: str, single_file: bool) -> None:
    path = write_model(tmp_path / "m.safetensors", family, fmt, single_file=single_file)
    info = checkpoint_info(path)
    assert (info.family, info.format, info.variant) == (family, fmt, None)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
@pytest.mark.parametrize("family", DETECTED_FAMILIES)
def test_gguf_family_and_quant(tmp_path: Path, family: str, fmt: str) -> None:
    info = checkpoint_info(write_gguf(tmp_path / "m.gguf", family, fmt))
    assert (info.family, info.format) == (family, fmt)


@pytest.mark.parametrize(("fmt", "dominant"), [("q4_k_s", "q4_k"), ("q8_0", "q8_0"), ("fp16", "fp16")])
def test_gguf_without_file_type_names_the_tensors_type(tmp_path: Path, fmt: str, dominant: str) -> None:
    info = checkpoint_info(write_gguf(tmp_path / "m.gguf", "flux1-dev", fmt, file_type=False))
    assert (info.family, info.format) == ("flux1-dev", dominant)


@pytest.mark.parametrize("metadata", [{"modelspec.prediction_type": "v"}, {"modelspec.prediction_type": "v_prediction"}])
def test_v_prediction_from_modelspec(tmp_path: Path, metadata: dict[str, str]) -> None:
    info = checkpoint_info(write_model(tmp_path / "noob.safetensors", "sdxl", single_file=True, metadata=metadata))
    assert (info.family, info.variant, info.format) == ("sdxl", "v-prediction", "fp16")
    assert info.describe() == "sdxl (v-prediction, fp16)"


def test_v_prediction_from_the_v_pred_key(tmp_path: Path) -> None:
    from tests.fixtures.model_headers import model_tensors

    tensors = {**model_tensors("sdxl", single_file=True), "v_pred": ("F32", [])}
    info = checkpoint_info(write_safetensors_model(tmp_path / "v.safetensors", tensors))
    assert (info.family, info.variant) == ("sdxl", "v-prediction")


def test_eps_sdxl_has_no_variant(tmp_path: Path) -> None:
    meta = {"modelspec.prediction_type": "epsilon"}
    info = checkpoint_info(write_model(tmp_path / "e.safetensors", "sdxl", single_file=True, metadata=meta))
    assert info.variant is None and info.describe() == "sdxl (fp16)"


def test_unknown_names_parameters_and_format(tmp_path: Path) -> None:
    tensors = {"encoder.layers.0.weight": ("BF16", [4, 3]), "encoder.layers.0.bias": ("BF16", [4])}
    info = checkpoint_info(write_safetensors_model(tmp_path / "llm.safetensors", tensors))
    assert info.family == "unknown"
    assert info.describe() == "unknown (16 parameters, format bf16)"


def test_ckpt_is_never_opened(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"\x80\x04 pickle")
    assert checkpoint_info(path).family == "unknown"


# Damaged headers: one reason, never an exception ------------------------------------------------


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 24, 200, -40])
def test_truncated_gguf_is_a_reason(tmp_path: Path, cut: int) -> None:
    data = gguf_bytes("flux1-dev", "q4_k_s")
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut - 32])
    with pytest.raises(WebuiError) as err:
        checkpoint_info(path)
    assert "cut.gguf" in err.value.message and "\n" not in err.value.message and err.value.hint


@pytest.mark.parametrize(("data", "words"), [
    (b"GGML" + bytes(40), "GGUF magic"),
    (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "version 99"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0), "claims"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77), "unknown type 77"),
])
def test_damaged_gguf_is_a_reason(tmp_path: Path, data: bytes, words: str) -> None:
    info = gguf_info(data, complete=True, bound=MAX_GGUF_HEADER_BYTES)
    assert info.family == "unknown" and info.reason is not None and words in info.reason
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(WebuiError) as err:
        checkpoint_info(path)
    assert words in err.value.message


def test_gguf_header_over_the_bound_is_refused_with_the_reason() -> None:
    huge_key = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 10 * MAX_GGUF_HEADER_BYTES)
    info = gguf_info(huge_key + bytes(64), complete=False, bound=MAX_GGUF_HEADER_BYTES)
    assert info.family == "unknown" and info.reason == "its GGUF header is larger than the 16 MiB lowvram reads"


@pytest.mark.parametrize(("raw", "words"), [
    (struct.pack("<Q", 1 << 40) + b"{}", "claims a"),
    (struct.pack("<Q", 8) + b"{broken}", "not valid JSON"),
    (struct.pack("<Q", 64) + b"{}", "truncated"),
])
def test_damaged_safetensors_is_a_reason(tmp_path: Path, raw: bytes, words: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(WebuiError) as err:
        checkpoint_info(path)
    assert words in err.value.message and err.value.hint


# What the user sees -----------------------------------------------------------------------------


@pytest.fixture
def flux_webui(tmp_path: Path, rtx3060_cwd: Path) -> Path:
    root = make_webui(tmp_path / "forge", flavor="forge", family=None)
    write_model(root / "models" / "Stable-diffusion" / "flux1-dev-bnb-nf4.safetensors", "flux1-dev", "nf4",
                single_file=True)
    return root


def test_doctor_shows_family_variant_and_format(cli, tmp_path: Path, flux_webui: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("doctor", "--webui", str(flux_webui))
    line = next(x for x in result.out.splitlines() if "webui.checkpoint" in x)
    assert "flux1-dev-bnb-nf4.safetensors: FLUX.1 dev (nf4)" in line and "no memory model" in line
    assert "Traceback" not in result.err
    w = json.loads(cli("doctor", "--webui", str(flux_webui), "--json").out)["webui"]
    assert (w["model_family"], w["model_variant"], w["model_format"]) == ("flux1-dev", None, "nf4")


def test_doctor_json_shows_v_prediction(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.SCENARIOS["rtx3060"]())
    root = make_webui(tmp_path / "sd", family=None)
    write_model(root / "models" / "Stable-diffusion" / "noob.safetensors", "sdxl", "bf16", single_file=True,
                metadata={"modelspec.prediction_type": "v"})
    result = cli("doctor", "--webui", str(root))
    assert "noob.safetensors: SDXL (v-prediction, bf16)" in result.out
    w = json.loads(cli("doctor", "--webui", str(root), "--json").out)["webui"]
    assert (w["model_family"], w["model_variant"], w["model_format"]) == ("sdxl", "v-prediction", "bf16")


def test_gguf_in_the_checkpoint_folder_is_found(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.SCENARIOS["rtx3060"]())
    root = make_webui(tmp_path / "forge", flavor="forge", family=None)
    write_gguf(root / "models" / "Stable-diffusion" / "flux1-schnell-Q4_K_S.gguf", "flux1-schnell", "q4_k_s")
    w = json.loads(cli("doctor", "--webui", str(root), "--json").out)["webui"]
    assert (w["checkpoint"], w["model_family"], w["model_format"]) == \
        ("flux1-schnell-Q4_K_S.gguf", "flux1-schnell", "q4_k_s")


def test_an_a1111_tree_skips_a_gguf_as_a1111_does(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A1111 lists only .ckpt/.safetensors: a .gguf sorted first must not become the checkpoint it loads."""
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.SCENARIOS["rtx3060"]())
    root = make_webui(tmp_path / "a1111", flavor="a1111", family=None)
    write_gguf(root / "models" / "Stable-diffusion" / "a-flux1-schnell-Q4_K_S.gguf", "flux1-schnell", "q4_k_s")
    w = json.loads(cli("doctor", "--webui", str(root), "--json").out)["webui"]
    assert w["checkpoint"] is None or not str(w["checkpoint"]).endswith(".gguf"), w
    assert w["model_family"] != "flux1-schnell"


@pytest.mark.parametrize("command", ["plan", "estimate"])
def test_plan_and_estimate_model_the_detected_flux_file(cli, flux_webui: Path, command: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 18 item 4: the Flux file Forge has selected is planned and estimated as flux1-dev in nf4."""
    result = cli(command, "--webui", str(flux_webui), "--json")
    assert result.code == 0 and "Traceback" not in result.err, result.err
    data = json.loads(result.out)
    if command == "plan":
        decided = {d["setting"]: d["value"] for d in data["decisions"]}
        assert (data["model_family"], decided["model_format"]) == ("flux1-dev", "nf4")
    else:
        assert "flux1-dev" in json.dumps(data) and "nf4" in json.dumps(data)


@pytest.mark.parametrize("command", ["plan", "estimate"])
def test_model_answers_a_family_they_cannot_model(cli, flux_webui: Path, command: str) -> None:  # type: ignore[no-untyped-def]
    result = cli(command, "--webui", str(flux_webui), "--model", "sdxl")
    assert result.code == 0, result.out + result.err
    assert "sdxl" in result.out


def test_doctor_names_an_unknown_gguf_by_its_format(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nvml, "pynvml", fake_nvml.SCENARIOS["rtx3060"]())
    root = make_webui(tmp_path / "forge", flavor="forge", family=None)
    data = gguf_bytes("flux1-dev", "q8_0").replace(b"double_blocks", b"doubleXblocks").replace(b"guidance_in", b"guidanceXin")
    (root / "models" / "Stable-diffusion" / "odd.gguf").write_bytes(data)
    result = cli("doctor", "--webui", str(root))
    line = next(x for x in result.out.splitlines() if "webui.checkpoint" in x)
    assert "odd.gguf: model family unknown" in line and "format q8_0" in line and "pickle" not in line


def test_facts_file_carries_the_new_fields(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """doctor --json's output read back as --facts: the new families and keys pass; old files lack them."""
    from lowvram.core.facts import facts_from_dict

    old = json.loads(cli("doctor", "--json", "--facts", str(_facts_file(tmp_path, None))).out)
    assert facts_from_dict(old).webui is not None
    new = json.loads(json.dumps(old))
    new["webui"].update(model_family="sd3.5-large", model_variant=None, model_format="q8_0")
    w = facts_from_dict(new).webui
    assert w is not None and (w.model_family, w.model_variant, w.model_format) == ("sd3.5-large", None, "q8_0")
    del new["webui"]["model_format"], new["webui"]["model_variant"]
    w = facts_from_dict(new).webui
    assert w is not None and (w.model_variant, w.model_format) == (None, None)


def _facts_file(tmp_path: Path, family: str | None) -> Path:
    from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts

    facts = with_webui(next(iter(MACHINES.values())), "a1111", family or "sdxl")
    return write_facts(facts, tmp_path / "facts.json")
