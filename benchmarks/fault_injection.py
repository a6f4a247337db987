"""kill -9 at random moments of `lowvram apply`, `install-extensions` and `revert`, many times.

The same trials as tests/integration/test_faults_kill.py (tests/fixtures/faults.py), at the issue's
scale: per operation, half the trials SIGKILL the run after a random delay, half at a random kill
point (`LOWVRAM_KILL_AT=n`). After each kill: every user file and extension checkout is the old or
the new version byte for byte, the next run succeeds and leaves no temp file or half-made clone,
and revert gives back the original tree. Prints, per operation, how many trials passed and which
kill points were covered.

    .venv/bin/python benchmarks/fault_injection.py [--trials 200] [--workers 2] [--seed N] [--ops apply,revert]

`--linked`: the same trials on a tree whose webui-user.sh, config.json and extensions/ are links to
places inside it (tests/fixtures/links_special.py LinkedLab): each link must stay the same link.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.faults import OPS, Lab, TrialResult  # noqa: E402


def _lab(root: Path, linked: bool) -> Lab:
    if linked:
        from tests.fixtures.links_special import LinkedLab

        return LinkedLab(root)
    return Lab(root)


def _worker(args: tuple[str, str, list[dict[str, float | int]], bool]) -> list[TrialResult]:
    root, op, kills, linked = args
    lab = _lab(Path(root), linked)
    lab.reference(op)
    return [lab.trial(op, **k) for k in kills]  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per operation (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="labs run side by side (default 2)")
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    parser.add_argument("--linked", action="store_true",
                        help="webui-user.sh, config.json and extensions/ as links inside the tree")
    args = parser.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    failed_total = 0
    with tempfile.TemporaryDirectory(prefix="lowvram-faults-") as tmp_name:
        tmp = Path(tmp_name)
        # One lab to draw the schedule from (the kill points and timings of an uninterrupted run).
        from tests.fixtures.faults import schedule

        planner = _lab(tmp / "planner", args.linked)
        print(f"fault injection: {args.trials} trials per operation, seed {args.seed}, {args.workers} workers")
        print(f"{'operation':<20}{'passed':>10}{'killed':>8}{'points':>9}{'indices':>10}{'seconds':>9}")
        for op in ops:
            ref = planner.reference(op)
            kills = schedule(planner, op, args.trials, args.seed)
            chunks = [kills[i::args.workers] for i in range(args.workers)]
            start = time.monotonic()
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                jobs = [(str(tmp / f"{op}-{i}"), op, chunk, args.linked) for i, chunk in enumerate(chunks) if chunk]
                results = [r for batch in pool.map(_worker, jobs) for r in batch]
            elapsed = time.monotonic() - start
            passed = sum(r.ok for r in results)
            killed = [r for r in results if r.killed]
            names = sorted(set(ref.points))
            reached = {r.last_point for r in killed}
            indices = {int(r.how.split(":")[1]) for r in results if r.how.startswith("point:")}
            print(f"{op:<20}{passed:>6}/{len(results):<3}{len(killed):>8}"
                  f"{len(reached & set(names)):>5}/{len(names):<3}{len(indices):>6}/{len(ref.points):<3}"
                  f"{elapsed:>9.0f}")
            where = Counter(r.last_point for r in killed)
            for name in [*names, "(start-up)"]:
                print(f"    {where.get(name, 0):>4} killed after {name}")
            for r in results:
                if not r.ok:
                    failed_total += 1
                    print(f"  FAILED {r.how} (after {r.last_point}): {r.problem}")
    print("all trials passed" if failed_total == 0 else f"{failed_total} trials FAILED")
    return 1 if failed_total else 0


if __name__ == "__main__":
    raise SystemExit(main())
