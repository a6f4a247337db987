"""Check lowvram against a REAL A1111 checkout (not a fixture): the acceptance checks of issues 4 and 5.

    python scripts/check_real_a1111.py /path/to/stable-diffusion-webui [--mirror DIR]

The checkout is copied to a temp dir first (yours is never touched). On the copy, with a GTX 1070's
facts (this machine's own facts plus that GPU, so it works without one):
1. `lowvram apply --profile gtx1070-sdxl` writes the block (extensions from --mirror DIR/<key>
   when given);
2. A1111's own `webui.sh` (python_cmd = a recorder, venv_dir=-) hands the planned
   COMMANDLINE_ARGS and LD_PRELOAD to Python;
3. A1111's own argument parser (modules/cmd_args.py) accepts the planned flags;
4. the hook registers on A1111's own modules/script_callbacks.py and survives a job without CUDA
   (fastapi/gradio are stubbed: script_callbacks imports them only for annotations; needs torch);
5. `lowvram revert` restores every file of the tree byte for byte.
Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RECORDER = """#!{python}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "COMMANDLINE_ARGS": os.environ.get("COMMANDLINE_ARGS"),
           "LD_PRELOAD": os.environ.get("LD_PRELOAD")}}, open({out!r}, "w"))
"""

HOOK_PROBE = """
import json, os, sys, types
for name, attr in (("fastapi", "FastAPI"), ("gradio", "Blocks")):
    m = types.ModuleType(name); setattr(m, attr, type(attr, (), {})); sys.modules[name] = m
sys.path.insert(0, sys.argv[1])
import modules.script_callbacks as sc
for short in ("scripts", "shared", "devices"):
    m = types.ModuleType("modules." + short); sys.modules[m.__name__] = m; setattr(sys.modules["modules"], short, m)
class Script:
    def show(self, is_img2img): return None
sys.modules["modules.scripts"].Script = Script
sys.modules["modules.scripts"].AlwaysVisible = object()
sys.modules["modules.shared"].sd_model = None
import importlib.util, torch
spec = importlib.util.spec_from_file_location("lowvram_layout", sys.argv[2])
hook = importlib.util.module_from_spec(spec); spec.loader.exec_module(hook)
n_loaded = len(sc.callback_map["callbacks_model_loaded"]); n_cfg = len(sc.callback_map["callbacks_cfg_denoiser"])
model = torch.nn.Module(); model.model = torch.nn.Module(); model.model.diffusion_model = torch.nn.Linear(4, 4)
sc.model_loaded_callback(model)
p = types.SimpleNamespace(width=512, height=512, batch_size=1, steps=2, enable_hr=False, sd_model=model)
sys.modules["modules.shared"].sd_model = model
script = hook.LowvramLayout()
script.process(p)
for step in range(2):
    sc.cfg_denoiser_callback(sc.CFGDenoiserParams(None, None, None, step, 2, None, None, None))
script.postprocess(p, None)
print(json.dumps({"model_loaded": n_loaded, "cfg_denoiser": n_cfg}))
"""


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if ".git" in path.relative_to(root).parts or not path.is_file():
            continue
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def lowvram(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True, env=env,
                          check=False, timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("webui", type=Path, help="a real A1111 checkout (copied; never changed)")
    parser.add_argument("--mirror", type=Path, help="LOWVRAM_MIRROR: DIR/vram-estimator, DIR/giant-kitten")
    args = parser.parse_args()
    results: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tree = tmp / "stable-diffusion-webui"
        shutil.copytree(args.webui, tree, symlinks=True)
        env = dict(os.environ, LOWVRAM_HOME=str(tmp / "home"), NO_COLOR="1")
        if args.mirror:
            env["LOWVRAM_MIRROR"] = str(args.mirror.resolve())
        doctor = json.loads(lowvram("doctor", "--json", env=env).stdout)
        doctor["gpus"] = [{"index": 0, "uuid": "GPU-1070", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
                           "vram_free_mb": 7900, "driver": "535.54.03", "cuda_driver": "12.2",
                           "compute_capability": "6.1", "pcie_gen": 3, "pcie_width": 16}]
        doctor["nvml_error"] = None
        facts = tmp / "gtx1070.json"
        facts.write_text(json.dumps(doctor))
        before = tree_hashes(tree)

        applied = lowvram("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "gtx1070-sdxl",
                          "--json", env=env)
        plan = json.loads(applied.stdout)["plan"]
        results.append(("apply writes the block", applied.returncode in (0, 1) and "lowvram managed block"
                        in (tree / "webui-user.sh").read_text(), f"exit {applied.returncode}"))

        out = tmp / "received.json"
        recorder = tmp / "recorder"
        recorder.write_text(RECORDER.format(python=sys.executable, out=str(out)))
        recorder.chmod(0o755)
        run_env = dict(os.environ, venv_dir="-", python_cmd=str(recorder))
        subprocess.run(["bash", "webui.sh", "-f"], cwd=tree, env=run_env, capture_output=True, check=False,
                       timeout=120)
        got = json.loads(out.read_text()) if out.exists() else {}
        want_args = plan["env"].get("COMMANDLINE_ARGS")
        want_preload = plan["env"].get("LD_PRELOAD")
        results.append(("webui.sh hands COMMANDLINE_ARGS to Python", got.get("COMMANDLINE_ARGS") == want_args,
                        f"{got.get('COMMANDLINE_ARGS')!r}"))
        results.append(("webui.sh hands LD_PRELOAD to Python", got.get("LD_PRELOAD") == want_preload,
                        f"{got.get('LD_PRELOAD')!r}"))

        probe = ("import sys; sys.argv = ['launch.py']; from modules import cmd_args; "
                 f"cmd_args.parser.parse_args({plan['args']!r}); print('ok')")
        parsed = subprocess.run([sys.executable, "-c", probe], cwd=tree, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), check=False, timeout=120)
        results.append(("A1111's parser accepts the planned flags", parsed.stdout.strip() == "ok",
                        " ".join(plan["args"]) if parsed.returncode == 0 else parsed.stderr.strip()[-200:]))

        hook_file = tree / "extensions" / "lowvram-layout" / "scripts" / "lowvram_layout.py"
        hook_env = dict(env, LOWVRAM_CONFIG=str(tmp / "home" / "probe-hook.json"), PYTHONDONTWRITEBYTECODE="1")
        Path(hook_env["LOWVRAM_CONFIG"]).write_text(json.dumps(
            {"schema": 1, "layout": True, "reserve_mb": 512, "observations": str(tmp / "obs.jsonl")}))
        hooked = subprocess.run([sys.executable, "-c", HOOK_PROBE, str(tree), str(hook_file)], capture_output=True,
                                text=True, env=hook_env, check=False, timeout=300)
        counts = json.loads(hooked.stdout.strip().splitlines()[-1]) if hooked.returncode == 0 else {}
        results.append(("hook registers on A1111's script_callbacks and survives without CUDA",
                        counts.get("model_loaded") == 1 and counts.get("cfg_denoiser") == 1
                        and (tmp / "obs.jsonl").exists(), hooked.stderr.strip().splitlines()[-1][:160]
                        if hooked.stderr.strip() else str(counts)))

        reverted = lowvram("revert", "--webui", str(tree), env=env)
        after = tree_hashes(tree)
        diff = sorted(set(before.items()) ^ set(after.items()))
        results.append(("revert restores the tree byte for byte", reverted.returncode == 0 and not diff,
                        f"{len(diff)} differing entries"))
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {name}  ({detail})")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
