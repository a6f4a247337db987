"""doctor checks lowvram's own work: a UI update or `git reset` that dropped the block is a warning."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_webui


def _check(out: str) -> dict[str, str]:
    report = json.loads(out)
    return next(c for c in report["checks"] if c["id"] == "lowvram.applied")


def test_doctor_follows_the_managed_block_through_apply_and_a_reset(cli, tmp_path: Path, monkeypatch) -> None:
    # No network in tests: extensions would come from an (empty) local mirror and fail fast.
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "no-mirror"))
    tree = make_webui(tmp_path / "webui")
    facts = write_facts(MACHINES["gtx1070-8gb"], tmp_path / "facts.json")
    pristine = (tree / "webui-user.sh").read_bytes()

    before = cli("doctor", "--webui", str(tree), "--facts", str(facts), "--json")
    assert _check(before.out)["status"] == "skip"

    applied = cli("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "gtx1070-sdxl",
                  "--offload", "medvram-sdxl", "--json")
    assert applied.code in (0, 1), applied.err  # 1 only when an extension could not be fetched offline
    after = cli("doctor", "--webui", str(tree), "--facts", str(facts), "--json")
    assert _check(after.out)["status"] == "ok"

    (tree / "webui-user.sh").write_bytes(pristine)  # what `git checkout webui-user.sh` would do
    reset = cli("doctor", "--webui", str(tree), "--facts", str(facts), "--json")
    check = _check(reset.out)
    assert check["status"] == "warn"
    assert "managed block" in check["message"]
    assert "lowvram apply" in check["hint"]
