"""What `lowvram launch` costs before the UI gets control, against running webui.sh directly.

Both start the same fake A1111 tree (tests/fixtures/launchers.py, in its light mode: launch.py
records the moment it starts and exits). The figure is the wall time from spawning the command to
launch.py's first line, median of N runs taken alternately so both see the same machine state.
`lowvram launch` does everything it does for a user: read the facts, plan, apply (steady state:
the block is already there, so nothing is rewritten), hold the lock, go through its LAUNCH_SCRIPT
wrapper (one extra Python start). The profile is gtx1070-sdxl without extensions (a user profile),
because installing them needs the network.

    .venv/bin/python benchmarks/launch_overhead.py [--runs 9]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.launchers import events, make_fake_a1111  # noqa: E402

FACTS = {
    "system": {"os": "linux", "ram_mb": 32768, "swap_mb": 0, "glibc": "2.35", "wsl": True, "sysmem_fallback": "on"},
    "gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
              "vram_free_mb": 7800, "driver": "546.01", "cuda_driver": "12.3", "compute_capability": "6.1"}],
    "tcmalloc": {"library": None, "usable": False, "reason": "benchmark"},
}


def time_to_control(cmd: list[str], cwd: Path, env: dict[str, str], record: Path) -> float:
    record.unlink(missing_ok=True)
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=120,
                          text=True)
    found = events(record, "start")
    if not found:
        raise SystemExit(f"the UI never started ({' '.join(cmd)}): {proc.stderr[-2000:]}")
    return float(found[0]["time"]) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lowvram-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tree = make_fake_a1111(tmp / "stable-diffusion-webui")
        home = tmp / "home"
        (home / "profiles").mkdir(parents=True)
        (home / "profiles" / "bench.yaml").write_text(
            "name: bench\ndescription: gtx1070-sdxl without extensions (no network here)\n"
            "extends: gtx1070-sdxl\nextensions: []\n")
        facts = tmp / "facts.json"
        facts.write_text(json.dumps(FACTS))
        record = tmp / "record.jsonl"
        env = {**os.environ, "LOWVRAM_HOME": str(home), "FAKE_UI_RECORD": str(record), "FAKE_UI_LIGHT": "1",
               "PYTHONPATH": str(REPO)}
        lowvram_cmd = [sys.executable, "-m", "lowvram", "launch", "--profile", "bench", "--webui", str(tree),
                       "--facts", str(facts)]
        time_to_control(lowvram_cmd, REPO, env, record)  # first run applies the block; later ones find it
        direct_env = {**env, "install_dir": str(tree.parent), "clone_dir": tree.name}
        direct_cmd = ["bash", "webui.sh", *(["-f"] if os.geteuid() == 0 else [])]
        via, direct = [], []
        for _ in range(args.runs):
            via.append(time_to_control(lowvram_cmd, REPO, env, record))
            direct.append(time_to_control(direct_cmd, tree, direct_env, record))
        m_via, m_direct = statistics.median(via), statistics.median(direct)
        print(f"runs: {args.runs} each, alternating; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        print(f"{'':24}{'median':>10}{'min':>10}{'max':>10}")
        for name, xs in (("bash webui.sh", direct), ("lowvram launch", via)):
            print(f"{name:24}{statistics.median(xs) * 1000:>8.0f}ms{min(xs) * 1000:>8.0f}ms{max(xs) * 1000:>8.0f}ms")
        print(f"overhead: {(m_via - m_direct) * 1000:.0f} ms, ratio {m_via / m_direct:.1f}x")


if __name__ == "__main__":
    main()
