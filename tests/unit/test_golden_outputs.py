"""Golden outputs: `plan --json`, `estimate --json` and `doctor --json`, recorded before a refactor
and compared exactly after it (issue 15, step 5: "proof that nothing changed").

Every case runs the CLI in-process from a facts file, so nothing depends on this machine's GPU,
kernel or RAM. Paths that vary per run (the WebUI trees, LOWVRAM_HOME, the facts files) become
placeholders before the comparison.

Regenerate after an intended change, then review the diff of tests/golden/*.json:

    LOWVRAM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_golden_outputs.py
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult
from tests.fixtures.facts_matrix import MACHINES, with_webui, write_facts
from tests.fixtures.webui_trees import make_webui

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("LOWVRAM_UPDATE_GOLDEN") == "1"

FAMILIES = ("sd15", "sd2", "sdxl")
UIS = ("a1111", "forge", "sdnext", "comfyui")
FLAVORS = ("a1111", "forge", "sdnext", "comfyui")
# A 4 GB Turing 16xx on Linux, an 8 GB Ada on Windows (sysmem fallback), 12 GB under WSL, no GPU.
SOME_MACHINES = ("gtx1650-4gb", "rtx4060-8gb-win", "rtx3060-12gb-wsl", "no-gpu")
PLAN_OVERRIDES: dict[str, tuple[str, ...]] = {
    "offload=none": ("--offload", "none"),
    "offload=medvram-sdxl": ("--offload", "medvram-sdxl"),
    "offload=medvram": ("--offload", "medvram"),
    "offload=lowvram": ("--offload", "lowvram"),
    "layout=on": ("--layout", "on"),
    "layout=off": ("--layout", "off"),
    "sysmem=on": ("--sysmem-fallback", "on"),
    "sysmem=off": ("--sysmem-fallback", "off"),
    "profile=generic-sdxl": ("-p", "generic-sdxl"),
    "model=sd15": ("--model", "sd15"),
}

Run = Callable[..., CliResult]
# lowvram's state for a tree lives under LOWVRAM_HOME/webuis/<hash of the tree's path>.
STATE_ID = re.compile(r"(?<=/webuis/)[0-9a-f]{12}(?=/|$)")
FIXED_MTIME = 1_700_000_000  # the trees' files, so checkpoint keys (name|size|mtime) stay put


# ---- running and normalising -------------------------------------------------------------------

class Recorder:
    """Runs cases and keeps their normalised results, keyed by case id."""

    def __init__(self, cli: Run, placeholders: dict[str, str]) -> None:
        self.cli = cli
        # Longest first, so a tree inside the tmp dir is replaced before the tmp dir itself.
        self.placeholders = sorted(placeholders.items(), key=lambda kv: -len(kv[0]))
        self.results: dict[str, Any] = {}

    def _norm(self, value: Any) -> Any:
        if isinstance(value, str):
            for raw, name in self.placeholders:
                value = value.replace(raw, name)
            return STATE_ID.sub("<ID>", value)
        if isinstance(value, list):
            return [self._norm(v) for v in value]
        if isinstance(value, dict):
            return {self._norm(k): self._norm(v) for k, v in value.items()}
        return value

    def run(self, case: str, *args: str) -> None:
        assert case not in self.results, f"duplicate case id {case}"
        res = self.cli(*args)
        try:
            out: Any = json.loads(res.out)
        except json.JSONDecodeError:
            out = res.out
        entry: dict[str, Any] = {"code": res.code, "out": out}
        if res.code != 0 and res.err:
            entry["err"] = res.err
        self.results[case] = self._norm(entry)


def _placeholders(tmp: Path, home: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path, name in ((tmp, "<TMP>"), (home, "<HOME>")):
        for form in (str(path), str(path.resolve()), path.as_posix()):
            found[form] = name
    return found


# ---- comparing --------------------------------------------------------------------------------

def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix or "(root)", value


def _short(value: Any, width: int = 100) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def _case_diff(old: Any, new: Any, limit: int = 8) -> list[str]:
    before, after = dict(_flatten(old)), dict(_flatten(new))
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            lines.append(f"    {key}: {_short(before.get(key, '<absent>'))} -> {_short(after.get(key, '<absent>'))}")
    more = len(lines) - limit
    return lines[:limit] + ([f"    … and {more} more"] if more > 0 else [])


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def check_golden(name: str, results: dict[str, Any], max_cases: int = 5) -> None:
    path = GOLDEN / f"{name}.json"
    # Round-trip so tuples, key order and float text compare as the file holds them.
    current = json.loads(_dump(results))
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(_dump(current), encoding="utf-8")
        return
    assert path.exists(), f"{path} missing: run with LOWVRAM_UPDATE_GOLDEN=1 to record it"
    golden = json.loads(path.read_text(encoding="utf-8"))
    if golden == current:
        return
    missing = sorted(golden.keys() - current.keys())
    added = sorted(current.keys() - golden.keys())
    changed = sorted(k for k in golden.keys() & current.keys() if golden[k] != current[k])
    report = [f"{name}: output differs from {path.relative_to(GOLDEN.parent.parent)} "
              f"({len(changed)} changed, {len(missing)} missing, {len(added)} new cases)"]
    if missing:
        report.append("  missing: " + ", ".join(missing[:10]) + (" …" if len(missing) > 10 else ""))
    if added:
        report.append("  new: " + ", ".join(added[:10]) + (" …" if len(added) > 10 else ""))
    for case in changed[:max_cases]:
        report.append(f"  {case}:")
        report.extend(_case_diff(golden[case], current[case]))
    if len(changed) > max_cases:
        report.append(f"  … and {len(changed) - max_cases} more changed: " + ", ".join(changed[max_cases:max_cases + 10]))
    report.append("If the change is intended: LOWVRAM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest "
                  "tests/unit/test_golden_outputs.py, and review the diff.")
    pytest.fail("\n".join(report), pytrace=False)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def recorder(cli: Run, tmp_path: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    # No WebUI in the working directory, none remembered: only what each case names.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return Recorder(cli, _placeholders(tmp_path, lowvram_home))


def _facts_dir(tmp_path: Path) -> Path:
    d = tmp_path / "facts"
    d.mkdir(exist_ok=True)
    return d


def _facts(tmp_path: Path, name: str, facts: Any) -> str:
    return str(write_facts(facts, _facts_dir(tmp_path) / f"{name}.json"))


def _trees(tmp_path: Path) -> dict[str, Path]:
    trees = {flavor: make_webui(tmp_path / "trees" / flavor, flavor=flavor,
                                version="0.3.40" if flavor == "comfyui" else ("1.8.0" if flavor == "a1111" else None))
             for flavor in FLAVORS}
    for path in (tmp_path / "trees").rglob("*"):
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    return trees


# ---- the cases --------------------------------------------------------------------------------

def test_plan_golden(recorder: Recorder, tmp_path: Path) -> None:
    # The whole matrix: every machine × family × UI, the WebUI as the facts file describes it.
    for machine, facts in MACHINES.items():
        for family in FAMILIES:
            for ui in UIS:
                f = _facts(tmp_path, f"{machine}-{family}-{ui}", with_webui(facts, ui, family))
                recorder.run(f"matrix/{machine}/{family}/{ui}", "plan", "--json", "--facts", f)
    # The user's overrides, on a few machines (A1111, SDXL).
    for machine in SOME_MACHINES:
        f = _facts(tmp_path, f"{machine}-sdxl-a1111", with_webui(MACHINES[machine], "a1111", "sdxl"))
        for name, args in PLAN_OVERRIDES.items():
            recorder.run(f"override/{machine}/{name}", "plan", "--json", "--facts", f, *args)
    # A user's own flags in webui-user (kept, replaced, contradicting the plan).
    for machine in ("gtx1650-4gb", "rtx4060-8gb-win"):
        for label, user_args in (("medvram", ("--medvram",)), ("lowvram-xformers", ("--lowvram", "--xformers")),
                                 ("no-half", ("--no-half", "--precision", "full")), ("listen", ("--listen",))):
            facts = with_webui(MACHINES[machine], "a1111", "sdxl", user_args=user_args)
            recorder.run(f"user-args/{machine}/{label}", "plan", "--json", "--facts",
                         _facts(tmp_path, f"{machine}-{label}", facts))
    # No WebUI anywhere: the target UI and model come from the options.
    for machine in SOME_MACHINES:
        f = _facts(tmp_path, f"{machine}-bare", MACHINES[machine])
        for ui in UIS:
            recorder.run(f"no-webui/{machine}/{ui}", "plan", "--json", "--facts", f, "--ui", ui, "--model", "sdxl")
    # Real trees on disk (hook config path, venv probing, the flavour read from the tree).
    trees = _trees(tmp_path)
    for machine in SOME_MACHINES:
        f = _facts(tmp_path, f"{machine}-bare", MACHINES[machine])
        for flavor, root in trees.items():
            # The ComfyUI stand-in selects no checkpoint (ComfyUI picks one per workflow): say which.
            model = ("--model", "sdxl") if flavor == "comfyui" else ()
            recorder.run(f"tree/{machine}/{flavor}", "plan", "--json", "--facts", f, "--webui", str(root), *model)
    check_golden("plan", recorder.results)


ESTIMATES: dict[str, tuple[str, ...]] = {
    "sd15-512": ("--model", "sd15", "--width", "512", "--height", "512"),
    "sd15-512-medvram": ("--model", "sd15", "--width", "512", "--height", "512", "--offload", "medvram"),
    "sd15-512-lowvram": ("--model", "sd15", "--width", "512", "--height", "512", "--offload", "lowvram"),
    "sd15-512-batch4": ("--model", "sd15", "--width", "512", "--height", "512", "--batch", "4"),
    "sd15-512-hires2": ("--model", "sd15", "--width", "512", "--height", "512", "--hires-scale", "2"),
    "sd15-768-full": ("--model", "sd15", "--width", "768", "--height", "768", "--precision", "full",
                      "--vae-precision", "full"),
    "sd15-512-attn-none": ("--model", "sd15", "--attention", "none"),
    "sd15-512-attn-split": ("--model", "sd15", "--attention", "split"),
    "sd15-512-attn-subquad": ("--model", "sd15", "--attention", "sub-quad"),
    "sd15-512-attn-xformers": ("--model", "sd15", "--attention", "xformers"),
    "sd2-768": ("--model", "sd2", "--width", "768", "--height", "768"),
    "sdxl-1024": ("--model", "sdxl", "--width", "1024", "--height", "1024"),
    "sdxl-1024-medvram-sdxl": ("--model", "sdxl", "--width", "1024", "--height", "1024", "--offload", "medvram-sdxl"),
    "sdxl-1024-medvram": ("--model", "sdxl", "--width", "1024", "--height", "1024", "--offload", "medvram"),
    "sdxl-1024-lowvram": ("--model", "sdxl", "--width", "1024", "--height", "1024", "--offload", "lowvram"),
    "sdxl-1024-batch2": ("--model", "sdxl", "--width", "1024", "--height", "1024", "--batch", "2"),
    "sdxl-1024-hires1.5-tiled": ("--model", "sdxl", "--hires-scale", "1.5", "--tiled-vae"),
    "sdxl-1024-vae-full": ("--model", "sdxl", "--vae-precision", "full"),
    "sdxl-refiner": ("--model", "sdxl-refiner"),
    "sdxl-832x1216": ("--model", "sdxl", "--width", "832", "--height", "1216"),
    "sdxl-comfyui": ("--model", "sdxl", "--ui", "comfyui"),
    "sdxl-forge": ("--model", "sdxl", "--ui", "forge"),
    "profile-gtx1070-sdxl": ("-p", "gtx1070-sdxl", "--model", "sdxl"),
    "profile-4gb-sd15": ("-p", "4gb-sd15", "--model", "sd15"),
    "no-model": ("--width", "512", "--height", "512"),
    "sweep-sd15": ("--model", "sd15", "--sweep"),
    "sweep-sdxl": ("--model", "sdxl", "--sweep"),
}


def test_estimate_golden(recorder: Recorder, tmp_path: Path) -> None:
    # Each setting on a 4 GB Linux card (from facts) and against a plain 8 GiB; a few on other machines.
    f4 = _facts(tmp_path, "gtx1650", MACHINES["gtx1650-4gb"])
    for name, args in ESTIMATES.items():
        recorder.run(f"gtx1650-4gb/{name}", "estimate", "--json", "--facts", f4, *args)
        recorder.run(f"vram-8192/{name}", "estimate", "--json", "--facts", f4, "--vram-mb", "8192", *args)
    for machine in ("gt1030-2gb", "rtx4060-8gb-win", "rtx3060-12gb", "rtx4090-24gb", "no-gpu", "two-gpus"):
        f = _facts(tmp_path, machine, MACHINES[machine])
        for name in ("sd15-512", "sdxl-1024", "sdxl-1024-medvram-sdxl", "sdxl-1024-lowvram"):
            recorder.run(f"{machine}/{name}", "estimate", "--json", "--facts", f, *ESTIMATES[name])
    check_golden("estimate", recorder.results)


def test_doctor_golden(recorder: Recorder, tmp_path: Path) -> None:
    for machine, facts in MACHINES.items():
        for label, variant in (("bare", facts), ("a1111-sdxl", with_webui(facts, "a1111", "sdxl")),
                               ("comfyui-sd15", with_webui(facts, "comfyui", "sd15"))):
            recorder.run(f"{machine}/{label}", "doctor", "--json", "--facts",
                         _facts(tmp_path, f"{machine}-{label}", variant))
    # WebUI details the checks look at: a CPU torch, an old driver for the torch, no torch yet, ...
    no_torch = with_webui(MACHINES["rtx3060-12gb"], "a1111", "sdxl")
    assert no_torch.webui is not None
    special = {
        "cpu-torch": with_webui(MACHINES["gtx1650-4gb"], "a1111", "sd15", torch="2.1.2+cpu"),
        "torch-cu126-old-driver": with_webui(MACHINES["gtx1070-8gb"], "forge", "sdxl", torch="2.6.0+cu126"),
        "no-torch": replace(no_torch, webui=replace(no_torch.webui, torch=None, torch_cuda=None)),
        "user-args": with_webui(MACHINES["rtx4060-8gb-win"], "a1111", "sdxl", user_args=("--medvram", "--xformers")),
        "sdnext-sdxl": with_webui(MACHINES["rtx2060-6gb"], "sdnext", "sdxl"),
        "no-checkpoint": with_webui(MACHINES["gtx1060-6gb"], "a1111", None),
    }
    for label, facts in special.items():
        recorder.run(f"special/{label}", "doctor", "--json", "--facts", _facts(tmp_path, label, facts))
    trees = _trees(tmp_path)
    for machine in ("gtx1650-4gb", "rtx4060-8gb-win"):
        f = _facts(tmp_path, f"{machine}-bare", MACHINES[machine])
        for flavor, root in trees.items():
            recorder.run(f"tree/{machine}/{flavor}", "doctor", "--json", "--facts", f, "--webui", str(root))
    check_golden("doctor", recorder.results)
