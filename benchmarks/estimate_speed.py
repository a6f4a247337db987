"""Estimates per second in-process (the policy and `--sweep` call the estimator freely).

Run: python benchmarks/estimate_speed.py [--runs 7] [--calls 20000]
Prints the median of several runs, in calls per second and microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from lowvram.core.estimate.memory import EstimateRequest, estimate, max_square_px

CASES = (
    EstimateRequest("sd15", 512, 512, 1),
    EstimateRequest("sdxl", 1024, 1024, 2, attention="xformers", offload="medvram-sdxl"),
    EstimateRequest("sdxl", 832, 1216, 1, hires_scale=1.5, tiled_vae=True),
    EstimateRequest("sd15", 768, 768, 4, attention="split", offload="lowvram"),
)


def _run(calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        estimate(CASES[i % len(CASES)])
    return calls / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    _run(1000)  # warm-up
    rates = [_run(args.calls) for _ in range(args.runs)]
    median = statistics.median(rates)
    print(f"estimate(): median {median:,.0f} calls/s ({1e6 / median:.1f} µs/call) over {args.runs} runs of {args.calls}")
    start = time.perf_counter()
    n = 200
    for i in range(n):
        max_square_px(CASES[i % len(CASES)], 8192, 256)
    per = (time.perf_counter() - start) / n
    print(f"max_square_px(): {per * 1e3:.2f} ms/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
