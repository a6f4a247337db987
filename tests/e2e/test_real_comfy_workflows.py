"""The workflows `lowvram tune` posts for a diffusion-model-only file, validated by the real ComfyUI v0.3.64
(behind LOWVRAM_E2E_COMFY): its /prompt checks every node class, input name, link type and listed file
name before it queues anything, so a 200 with no node_errors means the graph is one ComfyUI accepts. The
files are empty stand-ins named in an extra_model_paths.yaml of the test's own (the built tree is left as
it is); loading them fails later, after the check this test is about.

LOWVRAM_E2E_COMFY_GGUF=DIR adds the GGUF workflows: DIR holds `custom_nodes/ComfyUI-GGUF` (a clone of
city96/ComfyUI-GGUF) and `site/` with its `gguf` package (`pip install --no-deps --target DIR/site gguf`),
given to the real ComfyUI through the same yaml and PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from lowvram.world.tune.comfy_workflow import ModelSource, workflow
from tests.e2e.conftest import RealUi, api, free_port, kill_group, wait_http

SOURCES = {
    "flux1-dev": ModelSource("flux1-dev.safetensors", single_file=False, family="flux1-dev",
                             encoders=("t5xxl_fp16.safetensors", "clip_l.safetensors"), vae="ae.safetensors"),
    "sd3.5-large": ModelSource("sd3.5_large.safetensors", single_file=False, family="sd3.5-large",
                               encoders=("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"),
                               vae="sd35_vae.safetensors"),
    "sd3-medium (no T5)": ModelSource("sd3_medium.safetensors", single_file=False, family="sd3-medium",
                                      encoders=("clip_l.safetensors", "clip_g.safetensors"),
                                      vae="sd35_vae.safetensors"),
}
GGUF_SOURCES = {
    "flux1-dev Q4_0 + T5 Q8_0": ModelSource("flux1-dev-Q4_0.gguf", single_file=False, family="flux1-dev",
                                            encoders=("t5-v1_1-xxl-encoder-Q8_0.gguf", "clip_l.safetensors"),
                                            vae="ae.safetensors"),
    "sd3.5-large Q8_0": ModelSource("sd3.5_large-Q8_0.gguf", single_file=False, family="sd3.5-large",
                                    encoders=("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"),
                                    vae="sd35_vae.safetensors"),
}


def _gguf_dir() -> Path | None:
    given = os.environ.get("LOWVRAM_E2E_COMFY_GGUF")
    return Path(given) if given else None


def _post(port: int, graph: dict[str, Any]) -> tuple[int, Any]:
    try:
        return 200, api(port, "/prompt", {"prompt": graph}, timeout=60)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def comfy_with_stand_in_files(real_comfy: RealUi, tmp_path: Path):  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    sources = {**SOURCES, **GGUF_SOURCES}
    encoders = sorted({e for source in sources.values() for e in source.encoders})
    for folder, names in (("diffusion_models", [s.model for s in sources.values()]), ("text_encoders", encoders),
                          ("vae", ["ae.safetensors", "sd35_vae.safetensors"])):
        (models / folder).mkdir(parents=True)
        for name in names:
            (models / folder / name).write_bytes(b"\0" * 16)
    config = tmp_path / "extra_model_paths.yaml"
    gguf, env = _gguf_dir(), dict(real_comfy.env)
    nodes = f"  custom_nodes: {gguf / 'custom_nodes'}\n" if gguf is not None else ""
    if gguf is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf / "site"), env.get("PYTHONPATH")]))
    config.write_text(f"lowvram_test:\n  base_path: {models}\n  diffusion_models: diffusion_models\n"
                      f"  text_encoders: text_encoders\n  vae: vae\n{nodes}")
    port, log = free_port(), tmp_path / "comfy.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(real_comfy.tree / "venv" / "bin" / "python"), "main.py", "--cpu", "--listen",
                                 "127.0.0.1", "--port", str(port), "--extra-model-paths-config", str(config),
                                 "--output-directory", str(tmp_path / "out"), "--temp-directory", str(tmp_path)],
                                cwd=real_comfy.tree, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(port, "/object_info/KSampler", proc, log)
        yield port
    finally:
        kill_group(proc)


def test_the_real_comfyui_accepts_tunes_diffusion_model_workflows(comfy_with_stand_in_files: int) -> None:
    port = comfy_with_stand_in_files
    for name, source in SOURCES.items():
        code, body = _post(port, workflow(source, 64, 64, 2, "lowvram_tune"))
        assert code == 200 and not body.get("node_errors"), (name, code, body)


def test_a_workflow_the_real_comfyui_refuses_is_told_apart(comfy_with_stand_in_files: int) -> None:
    """The check can fail: a loader type ComfyUI v0.3.64 does not list is refused at /prompt."""
    graph = workflow(SOURCES["flux1-dev"], 64, 64, 2, "lowvram_tune")
    graph["8"]["inputs"]["type"] = "flux2"
    code, body = _post(comfy_with_stand_in_files, graph)
    assert code == 400 and "8" in body.get("node_errors", {}), body


def test_the_real_comfyui_gguf_nodes_accept_tunes_gguf_workflows(comfy_with_stand_in_files: int) -> None:
    if _gguf_dir() is None:
        pytest.skip("no ComfyUI-GGUF: set LOWVRAM_E2E_COMFY_GGUF (see this module's docstring)")
    port = comfy_with_stand_in_files
    for name, source in GGUF_SOURCES.items():
        graph = workflow(source, 64, 64, 2, "lowvram_tune")
        assert graph["1"]["class_type"] == "UnetLoaderGGUF"
        code, body = _post(port, graph)
        assert code == 200 and not body.get("node_errors"), (name, code, body)
