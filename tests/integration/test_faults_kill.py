"""kill -9 at random moments of `lowvram apply`, `install-extensions` and `revert` (the real CLI, in
subprocesses): every user file and extension checkout is the old or the new version byte for byte,
the next run succeeds and leaves no temp file or half-made clone, and revert restores the original.

Bounded and seeded (docs/architecture.md#tests): a few timer kills and a few kill-point indices per operation
here; benchmarks/fault_injection.py runs the same trials 200 times per operation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.fixtures.faults import Lab, TrialResult, run_trials, snapshot, units

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name == "nt", reason="SIGKILL and process groups")]

SEED = 20240607
TRIALS = {"apply": 6, "install-extensions": 6, "revert": 8}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return Lab(tmp_path_factory.mktemp("faults") / "lab")


def _failures(results: list[TrialResult]) -> list[str]:
    return [f"{r.how} (after {r.last_point}): {r.problem}" for r in results if not r.ok]


@pytest.mark.parametrize("op", list(TRIALS))
def test_random_kills_leave_old_or_new_and_the_next_run_finishes(lab: Lab, op: str) -> None:
    results = run_trials(lab, op, TRIALS[op], SEED)
    assert _failures(results) == []
    # The sample really interrupted the operation, at more than one place. Kill-point trials are
    # deterministic; timer kills depend on the machine's speed (a fast run may finish first), so
    # they must pass the checks but are not counted on to kill.
    at_points = [r for r in results if r.how.startswith("point:")]
    assert at_points and all(r.killed for r in at_points)
    distinct_indices = {r.how for r in at_points}
    killed = [r for r in results if r.killed]
    assert len({r.last_point for r in killed}) >= min(3, len(distinct_indices))


def test_every_trial_starts_from_the_same_bytes(lab: Lab) -> None:
    """The lab's premise: a reset gives back exactly the pristine tree, so old/new is well defined."""
    lab.reset("pristine")
    assert snapshot(lab.tree) == snapshot(lab.pristine)
    lab.reset("applied")
    assert units(lab.tree) == lab.reference("apply").after


def test_the_check_catches_a_torn_file(lab: Lab) -> None:
    """The old-or-new check is not vacuous: half a webui-user.sh is reported."""
    from tests.fixtures.faults import TrialFailure

    ref = lab.reference("apply")
    lab.reset("pristine")
    target = lab.tree / "webui-user.sh"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrialFailure, match=re.escape("webui-user.sh is neither old nor new")):
        lab.check_old_or_new(ref, where="torn on purpose")


def test_the_check_catches_a_half_cloned_extension(lab: Lab, tmp_path: Path) -> None:
    from tests.fixtures.faults import TrialFailure

    ref = lab.reference("install-extensions")
    lab.reset("pristine")
    vram = lab.remotes[0]
    half = lab.tree / "extensions" / vram.dir
    half.mkdir()
    (half / "README.md").write_text("half\n")
    with pytest.raises(TrialFailure, match=re.escape(f"extensions/{vram.dir}/ is neither old nor new")):
        lab.check_old_or_new(ref, where="half a clone on purpose")
