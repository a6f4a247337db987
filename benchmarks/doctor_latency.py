"""How long `lowvram doctor` takes, next to a bare `python -c pass` measured the same way.

Runs the two commands alternately (so both see the same machine load) N times each and prints
the medians and their ratio. The budget (issue 2): median under 0.35 s, about 8× `python -c pass`.

    python benchmarks/doctor_latency.py [-n 21] [--webui PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BUDGET_S = 0.35


def _time(cmd: list[str], env: dict[str, str], cpu: list[float] | None = None) -> float:
    """Wall seconds of one run; appends its CPU seconds (user + sys) to `cpu` where rusage exists."""
    before = _child_cpu()
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False, timeout=60)
    wall = time.perf_counter() - start
    after = _child_cpu()
    if cpu is not None and before is not None and after is not None:
        cpu.append(after - before)
    return wall


def _child_cpu() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=21, help="runs of each command (default 21)")
    parser.add_argument("--webui", help="also read this WebUI tree")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    doctor = [sys.executable, "-m", "lowvram", "doctor"] + (["--webui", args.webui] if args.webui else [])
    bare = [sys.executable, "-c", "pass"]
    _time(doctor, env)  # warm the page cache and .pyc files once
    _time(bare, env)
    doctor_s: list[float] = []
    bare_s: list[float] = []
    doctor_cpu: list[float] = []
    bare_cpu: list[float] = []
    for _ in range(args.n):
        doctor_s.append(_time(doctor, env, doctor_cpu))
        bare_s.append(_time(bare, env, bare_cpu))
    med_doctor = statistics.median(doctor_s)
    med_bare = statistics.median(bare_s)
    ratio = med_doctor / med_bare if med_bare else float("inf")
    result = {
        "runs": args.n,
        "doctor_median_s": round(med_doctor, 4),
        "python_pass_median_s": round(med_bare, 4),
        "ratio": round(ratio, 2),
        "budget_s": BUDGET_S,
        "within_budget": med_doctor < BUDGET_S,
        # CPU time barely moves with machine load; wall time does (other processes, 2 cores).
        "doctor_cpu_median_s": round(statistics.median(doctor_cpu), 4) if doctor_cpu else None,
        "python_pass_cpu_median_s": round(statistics.median(bare_cpu), 4) if bare_cpu else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"lowvram doctor   median {med_doctor * 1000:7.1f} ms  (min {min(doctor_s) * 1000:.1f}, max {max(doctor_s) * 1000:.1f})")
        print(f"python -c pass   median {med_bare * 1000:7.1f} ms  (min {min(bare_s) * 1000:.1f}, max {max(bare_s) * 1000:.1f})")
        print(f"ratio            {ratio:.1f}×   budget {BUDGET_S * 1000:.0f} ms: {'ok' if med_doctor < BUDGET_S else 'OVER'}")
        if doctor_cpu and bare_cpu:
            print(f"CPU (user+sys)   doctor {statistics.median(doctor_cpu) * 1000:.1f} ms, "
                  f"python -c pass {statistics.median(bare_cpu) * 1000:.1f} ms")
        if result["load_average"]:
            print(f"load average     {' '.join(f'{x:.2f}' for x in result['load_average'])} (wall times need a quiet machine)")
    return 0 if med_doctor < BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
