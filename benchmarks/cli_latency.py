"""CLI start-up latency: `lowvram --help`, `lowvram doctor`, `lowvram plan --facts …` vs `python -c pass`.

Each command runs alternately with a bare `python -c pass` (so both see the same machine load);
prints the median wall time of each and its ratio to the bare interpreter, plus which heavy
modules each command imported (torch, GitPython, pydantic must stay out).

    python benchmarks/cli_latency.py [-n 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FACTS = {
    "schema": 1,
    "system": {"os": "linux", "ram_mb": 32768, "swap_mb": 0, "glibc": "2.36", "wsl": False},
    "gpus": [{"index": 0, "uuid": "GPU-1070", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
              "vram_free_mb": 7900, "driver": "535.54", "cuda_driver": "12.2", "compute_capability": "6.1",
              "pcie_gen": 3, "pcie_width": 16}],
    "tcmalloc": {"library": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "usable": True, "reason": ""},
    "webui": None,
}

PROBE = (
    "import json, sys\nfrom lowvram.cli import main\n"
    "try:\n    main(sys.argv[1:])\nfinally:\n"
    "    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'git', 'gitdb', 'pydantic'})\n"
    "    sys.stderr.write('HEAVY=' + json.dumps(heavy) + '\\n')\n"
)


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False, timeout=120)
    return time.perf_counter() - start


def _heavy(args: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], check=False, capture_output=True, text=True, env=env, timeout=120)
    line = next((x for x in proc.stderr.splitlines() if x.startswith("HEAVY=")), "HEAVY=[]")
    return list(json.loads(line[6:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        facts = Path(tmp) / "gtx1070.json"
        facts.write_text(json.dumps(FACTS))
        env = dict(os.environ, NO_COLOR="1", LOWVRAM_HOME=str(Path(tmp) / "home"))
        commands = {
            "lowvram --help": ["--help"],
            "lowvram doctor": ["doctor"],
            "lowvram plan --facts": ["plan", "--facts", str(facts), "--model", "sdxl"],
        }
        bare = [sys.executable, "-c", "pass"]
        results: dict[str, dict[str, object]] = {}
        for name, cli_args in commands.items():
            cmd = [sys.executable, "-m", "lowvram", *cli_args]
            _wall(cmd, env)
            _wall(bare, env)
            runs, base = [], []
            for _ in range(args.n):
                runs.append(_wall(cmd, env))
                base.append(_wall(bare, env))
            med, med_bare = statistics.median(runs), statistics.median(base)
            results[name] = {"median_s": round(med, 4), "python_pass_s": round(med_bare, 4),
                             "ratio": round(med / med_bare, 1), "heavy_imports": _heavy(cli_args, env)}
    if args.json:
        print(json.dumps({"runs": args.n, "results": results}, indent=2))
        return 0
    print(f"median of {args.n} runs each, alternating with `python -c pass`")
    for name, r in results.items():
        heavy = ", ".join(r["heavy_imports"]) or "none"  # type: ignore[arg-type]
        print(f"{name:24} {r['median_s'] * 1000:7.0f} ms  python -c pass {r['python_pass_s'] * 1000:5.0f} ms"
              f"  ratio {r['ratio']:5.1f}x  heavy imports: {heavy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
