"""What lowvram learns about a model on a GPU carries across UIs (issue 19 item 5).

An A1111 tree and a Forge tree hold the same model file (a copy: another mtime, so another name|size|mtime
checkpoint key). The hook's records in the A1111 tree's state (an OOM, a peak) are evidence of the model's
memory for the Forge tree's plan and estimate on the same GPU, never on another GPU nor for another model,
and never A1111's own knobs (its reserve and layout). Every case runs the real CLI (in process).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import observation_log, paths
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_webui

MACHINE = "rtx3060-12gb"  # one GPU, uuid "GPU-0" in the facts matrix
CKPT = "sd_xl_base_1.0.safetensors"
A1111_RESERVE = 1234  # a reserve only A1111's layout uses: it must never reach Forge's plan


@pytest.fixture
def trees(tmp_path: Path) -> dict[str, Path]:
    a1111 = make_webui(tmp_path / "a1111", flavor="a1111", family="sdxl", checkpoint=CKPT)
    forge = make_webui(tmp_path / "forge", flavor="forge", version="f2.0.1v1.10.1-previous-1-g1", family=None)
    src = a1111 / "models" / "Stable-diffusion" / CKPT
    copy = forge / "models" / "Stable-diffusion" / CKPT
    shutil.copyfile(src, copy)  # the same content, another file
    os.utime(src, (1_600_000_000, 1_600_000_000))
    os.utime(copy, (1_700_000_000, 1_700_000_000))
    (forge / "config.json").write_text(json.dumps({"sd_model_checkpoint": CKPT}))
    return {"a1111": a1111, "forge": forge, "facts": write_facts(MACHINES[MACHINE], tmp_path / "facts.json")}


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.name}|{st.st_size}|{int(st.st_mtime)}"


def _record(tree: Path, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"schema": 1, "time": 1_700_000_100.0, "source": "hook",
                            "checkpoint": _key(tree / "models" / "Stable-diffusion" / CKPT), "family": "sdxl",
                            "flags": [], "road": "swap", "offload": "none", "layout": False, "width": 1024,
                            "height": 1024, "batch": 1, "steps": 20, "device": "cuda", "vram_total_mb": 12045,
                            "gpu_uuid": "GPU-0", "ok": False, "ooms": 1, "reason": "out of memory (OOM) during the job"}
    base.update(fields)
    return base


def _record_for(tree: Path, *records: dict[str, Any], raw: bytes | None = None) -> Path:
    """Write `tree`'s state as `apply` and the hook would: hook.json naming the tree, observations.jsonl."""
    hook = paths.hook_config_path(tree)
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(json.dumps({"schema": 1, "webui": str(tree.resolve()), "observations": "x"}))
    obs = paths.observations_path(tree)
    obs.write_bytes(raw if raw is not None else b"".join(json.dumps(r).encode() + b"\n" for r in records))
    return obs


def _plan(cli: Any, t: dict[str, Path]) -> dict[str, Any]:
    res = cli("plan", "--facts", str(t["facts"]), "--webui", str(t["forge"]), "--json")
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    data: dict[str, Any] = json.loads(res.out)
    return data


def _evidence(data: dict[str, Any]) -> dict[str, Any] | None:
    return next((d for d in data["decisions"] if d["setting"] == "evidence"), None)


def _offload(data: dict[str, Any]) -> str:
    return str(next(d for d in data["decisions"] if d["setting"] == "offload")["value"])


def test_an_oom_in_a1111_moves_the_forge_plan_on_the_same_gpu_and_says_where_it_came_from(cli, trees) -> None:
    before = _plan(cli, trees)
    assert _evidence(before) is None and before["estimate"]["fits"] is True and _offload(before) == "none"
    # Even --lowvram (the UNet moved block by block) ran out of memory at 1024²: this model needs far more than
    # the estimate says on this card, so Forge's whole-model load would not fit either.
    lowvram = {"offload": "lowvram", "flags": ["--lowvram"]}
    _record_for(trees["a1111"], _record(trees["a1111"], **lowvram),
                _record(trees["a1111"], time=1_700_000_200.0, **lowvram))
    after = _plan(cli, trees)
    evidence = _evidence(after)
    assert evidence is not None
    assert f"2 generations of this model on this GPU in A1111 at {trees['a1111'].resolve()}" in evidence["reason"]
    assert _offload(after) == "lowvram" and "--always-low-vram" in after["args"]
    assert "--always-low-vram" not in before["args"]


def test_an_oom_in_a1111_moves_the_forge_estimate(cli, trees) -> None:
    args = ("estimate", "--facts", str(trees["facts"]), "--webui", str(trees["forge"]), "--json")
    before = cli(*args)
    assert before.code == 0, before.err
    _record_for(trees["a1111"], _record(trees["a1111"]))
    after = cli(*args)
    assert after.code == 0, after.err
    b, a = json.loads(before.out), json.loads(after.out)
    assert a["peak_mb"] > b["peak_mb"]
    assert any("in A1111 at" in n for n in a["notes"]) and not any("A1111" in n for n in b["notes"])


def test_a_peak_measured_in_a1111_calibrates_the_forge_estimate(cli, trees) -> None:
    args = ("estimate", "--facts", str(trees["facts"]), "--webui", str(trees["forge"]), "--json")
    before = json.loads(cli(*args).out)
    _record_for(trees["a1111"], *[_record(trees["a1111"], ok=True, ooms=0, reason="", peak_allocated_mb=11000,
                                          peak_reserved_mb=11500, time=1_700_000_100.0 + i) for i in range(3)])
    after = json.loads(cli(*args).out)
    assert after["calibration"]["observations"] == 3 and before["calibration"]["observations"] == 0
    assert after["peak_mb"] > before["peak_mb"]


def test_not_on_another_gpu(cli, trees) -> None:
    before = _plan(cli, trees)
    _record_for(trees["a1111"], _record(trees["a1111"], gpu_uuid="GPU-another-card"))
    after = _plan(cli, trees)
    assert _evidence(after) is None and after["args"] == before["args"]
    assert after["estimate"] == before["estimate"]


def test_a_record_without_a_uuid_counts_only_for_a_card_of_its_size(cli, trees) -> None:
    """torch 2.1.2 (A1111 1.8) has no props.uuid: on a one-GPU machine a record of that card's size matches."""
    _record_for(trees["a1111"], _record(trees["a1111"], gpu_uuid=None, vram_total_mb=8192))
    assert _evidence(_plan(cli, trees)) is None
    _record_for(trees["a1111"], _record(trees["a1111"], gpu_uuid=None, vram_total_mb=12045))
    assert _evidence(_plan(cli, trees)) is not None


def test_not_for_another_model(cli, trees) -> None:
    """The same name and size, other bytes (another finetune): another content key."""
    copy = trees["forge"] / "models" / "Stable-diffusion" / CKPT
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    before = _plan(cli, trees)
    _record_for(trees["a1111"], _record(trees["a1111"]))
    after = _plan(cli, trees)
    assert _evidence(after) is None and after["args"] == before["args"]


def test_a1111_knobs_never_reach_the_forge_plan(cli, trees) -> None:
    """Runs with A1111's layout (its reserve) and manual reserve readings are not evidence for another UI."""
    before = _plan(cli, trees)
    _record_for(trees["a1111"],
                _record(trees["a1111"], road="resident", layout=True, reserve_mb=A1111_RESERVE),
                {"schema": 1, "time": 1_700_000_300.0, "source": "manual", "free_mb": 600, "overflow_mb": 1000,
                 "reserve_mb": A1111_RESERVE, "gpu_uuid": "GPU-0"})
    after = _plan(cli, trees)
    assert _evidence(after) is None and after["args"] == before["args"]
    assert after["reserve"] == before["reserve"] and str(A1111_RESERVE) not in json.dumps(after)


def test_damaged_and_special_files_in_other_trees_are_skipped_with_a_warning(cli, trees, tmp_path: Path) -> None:
    broken = make_webui(tmp_path / "broken", flavor="a1111", family=None)
    _record_for(broken, raw=b'{"schema": 1, "time": \n\xff\xfe not json\n')
    fifo_tree = make_webui(tmp_path / "fifo", flavor="a1111", family=None)
    obs = _record_for(fifo_tree, raw=b"")
    obs.unlink()
    os.mkfifo(obs)
    _record_for(trees["a1111"], _record(trees["a1111"]))
    data = _plan(cli, trees)
    assert _evidence(data) is not None  # the good tree still counts
    warnings = "\n".join(data["warnings"])
    assert "another WebUI's observations" in warnings and "skipped" in warnings
    assert "not an observations file" in warnings


def test_a_huge_file_in_another_tree_is_read_only_at_its_end(cli, trees, monkeypatch) -> None:
    monkeypatch.setattr(observation_log, "MAX_OTHER_BYTES", 4096)
    filler = json.dumps(_record(trees["a1111"], gpu_uuid="GPU-another-card")).encode() + b"\n"
    _record_for(trees["a1111"], raw=filler * 200 + json.dumps(_record(trees["a1111"])).encode() + b"\n")
    data = _plan(cli, trees)
    assert _evidence(data) is not None
    assert any("only its most recent lines were read" in w for w in data["warnings"])


def test_the_number_of_trees_read_is_bounded(cli, trees, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(observation_log, "MAX_OTHER_TREES", 3)
    for n in range(6):
        other = make_webui(tmp_path / f"a1111-{n}", flavor="a1111", family="sdxl", checkpoint=CKPT)
        shutil.copyfile(trees["a1111"] / "models" / "Stable-diffusion" / CKPT,
                        other / "models" / "Stable-diffusion" / CKPT)
        _record_for(other, _record(other))
    evidence = _evidence(_plan(cli, trees))
    assert evidence is not None and evidence["reason"].count("generation of this model") == 3


def test_the_hook_records_the_gpu_uuid_where_torch_has_it_and_none_where_not() -> None:
    """torch >= 2.2's props.uuid is bare hex; torch 2.1.2 (A1111 1.8's) has no uuid: the record says None."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "patches"))
    from lowvram_hook.records import read_gpu_uuid

    class Props:
        uuid = "5c1e2d3f-0000-1111-2222-333344445555"

    class Mover:
        def gpu_uuid(self) -> str:
            return "GPU-" + Props.uuid

    class OldTorch:
        def gpu_uuid(self) -> None:
            return None

    assert read_gpu_uuid(Mover()) == "GPU-5c1e2d3f-0000-1111-2222-333344445555"
    assert read_gpu_uuid(OldTorch()) is None and read_gpu_uuid(object()) is None
