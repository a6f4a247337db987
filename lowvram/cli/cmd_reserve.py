"""`lowvram reserve`: the layout reserve from this WebUI's observations, its formula, the tuning state.

`reserve --add --free-mb N --overflow-mb M` records the Task Manager readings giant-kitten's README
asks for (free dedicated memory after the model loaded, shared memory used by a large generation)
where the hook cannot measure. Without `--checkpoint` the reading counts for every checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lowvram.cli.options import FactsOpt, JsonOpt, WebuiOpt
from lowvram.core.errors import UsageError, WebuiError

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.observations import Observation
    from lowvram.core.reserve import ReserveResult

RECENT_ROWS = 8


def _find_webui(webui: Path | None) -> Path:
    from lowvram.world.detect import require_webui

    return require_webui(webui, why="observations are kept per WebUI")


def _gather(webui: Path, facts_file: Path | None) -> Facts:
    from lowvram.world.detect import gather_facts

    return gather_facts(webui, facts_file)


def _gpu(facts: Facts) -> tuple[int | None, str | None]:
    from lowvram.core.policy import webui_gpu

    gpu = webui_gpu(facts).gpu
    if gpu is None:
        return None, None
    return gpu.vram_total_mb, gpu.driver


def _gpu_uuid(facts: Facts) -> str | None:
    """The card's UUID, so the reading is matched to this GPU (it stays with A1111: a reserve is its knob)."""
    from lowvram.core.policy import webui_gpu

    gpu = webui_gpu(facts).gpu
    return gpu.uuid if gpu is not None else None


def _ckpt_name(key: str) -> str:
    return key.split("|", 1)[0]


def _checkpoint_dirs(webui: Path, facts: Facts) -> list[Path]:
    """Where A1111 looks for checkpoints (as detect does): the selected one's folder, --ckpt-dir,
    <--models-dir or --data-dir/models>/Stable-diffusion, then the tree's own models folder."""
    from lowvram.world.detect.webui import flag_value

    args = facts.webui.user_args if facts.webui is not None else None

    def under(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else webui / p

    dirs = []
    if facts.webui is not None and facts.webui.checkpoint_path:
        dirs.append(Path(facts.webui.checkpoint_path).parent)
    ckpt_dir = flag_value(args, "--ckpt-dir")
    if ckpt_dir:
        dirs.append(under(ckpt_dir))
    models = flag_value(args, "--models-dir")
    dirs.append((under(models) if models else under(flag_value(args, "--data-dir") or ".") / "models")
                / "Stable-diffusion")
    dirs.append(webui / "models" / "Stable-diffusion")
    return list(dict.fromkeys(dirs))


def resolve_checkpoint(name: str, webui: Path, facts: Facts, observations: list[Observation]) -> str | None:
    """A checkpoint file name → its observation key (name|size|mtime); None when nothing knows it.

    The name may be given as the UI lists it, `sd_xl_base_1.0.safetensors [31e35c80fc]`.
    """
    from lowvram.core.markers import checkpoint_key
    from lowvram.world.detect.webui import strip_hash

    if "|" in name:
        return name
    name = strip_hash(name).replace("\\", "/")
    if not name:
        return None
    for d in _checkpoint_dirs(webui, facts):
        candidate = d / name
        try:
            if candidate.is_file():
                st = candidate.stat()
                return checkpoint_key(candidate.name, st.st_size, st.st_mtime)
        except OSError:  # a name too long for the file system, a path through a file
            continue
    base = Path(name).name
    known = sorted((o for o in observations if o.checkpoint and _ckpt_name(o.checkpoint) == base), key=lambda o: o.time)
    return known[-1].checkpoint if known else None


def _cuda_context_mb() -> int | None:
    try:
        from lowvram.core.estimate.memory import CUDA_CONTEXT_MB
    except ImportError:
        return None
    return int(CUDA_CONTEXT_MB)


def reserve_report(webui: Path, checkpoint: str | None, facts: Facts, observations: list[Observation],
                   warnings: list[str]) -> dict[str, Any]:
    from lowvram.core.observations import observation_to_dict
    from lowvram.core.reserve import compute_reserve

    vram_total, driver = _gpu(facts)
    result: ReserveResult = compute_reserve(observations, checkpoint=checkpoint, vram_total_mb=vram_total,
                                            cuda_context_mb=_cuda_context_mb(), driver=driver)
    from lowvram.core.reserve_formula import formula_inputs

    inputs = formula_inputs(observations, checkpoint)
    return {
        "schema": 1,
        "reserve_mb": result.reserve_mb,
        "free_dedicated_mb": result.free_dedicated_mb,
        "overflow_mb": result.overflow_mb,
        "source": result.source,
        "observations": result.observations_used,
        "clamped_by": result.clamped_by,
        "tuning": result.tuning.to_dict() if result.tuning is not None else None,
        "reason": result.reason,
        "formula_mb": result.formula_mb,
        "webui": str(webui),
        "checkpoint": checkpoint,
        "vram_total_mb": vram_total,
        "cuda_context_mb": _cuda_context_mb(),
        "driver": driver,
        "recorded": len(observations),
        "used": [observation_to_dict(o) for o in inputs.runs],
        "warnings": warnings,
    }


def plan_use(root: Path, facts: Facts, facts_file: Path | None) -> dict[str, Any] | None:
    """Whether the plan for this WebUI uses a reserve at all, and why (None: cannot tell).

    The reserve only matters where the model is kept in VRAM and the overflow spills into RAM; where the
    driver never spills (native Linux) the plan swaps parts of the model to RAM and keeps no reserve.
    """
    from lowvram.core.errors import LowvramError
    from lowvram.core.plan import Overrides
    from lowvram.core.words import SWAP
    from lowvram.world.plan_inputs import make_plan

    try:
        plan = make_plan(webui=root, facts_file=facts_file, overrides=Overrides()).plan
    except LowvramError:
        plan = None
    if plan is None:
        if facts.system.sysmem_fallback in ("unsupported", "off"):
            return {"uses_reserve": False, "why": f"not used here: VRAM never spills into RAM on this machine (no "
                                                  f"sysmem fallback), so lowvram's plans {SWAP} and keep no reserve"}
        return None
    if plan.reserve.applied:
        return {"uses_reserve": True, "why": f"used: the plan keeps the model in VRAM and reserves {plan.reserve.mb} MiB"}
    why = {d.setting: d for d in plan.decisions}
    fallback = why.get("sysmem_fallback")
    if fallback is not None and fallback.value == "off":
        text = (f"not used here: {fallback.reason}, so the plan is to {SWAP} and keep no reserve "
                "(the figure above is what the readings alone give)")
    else:
        reason = why["road"].reason if "road" in why else ""
        text = "not used by the current plan" + (f", which is to {reason}" if reason.startswith(SWAP)
                                                 else f" ({reason})" if reason else "")
    return {"uses_reserve": False, "why": text}


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value} MiB"


def render_report(report: dict[str, Any]) -> str:
    from lowvram.cli import render

    lines = [render.style(render.wrap(f"Layout reserve for {report['webui']}"), "bold")]
    ck = report["checkpoint"]
    lines.append(render.wrap(f"checkpoint: {_ckpt_name(ck) if ck else 'unknown (only WebUI-wide readings count)'}"))
    lines.append("")
    # label → text rows; the text wraps in its column (docs/architecture.md#the-cli-contract: screens fit).
    facts: list[tuple[str, str]] = [("reserve", f"{report['reserve_mb']} MiB  (source: {report['source']})"),
                                    ("why", str(report["reason"]))]
    if report.get("plan"):
        facts.append(("plan", str(report["plan"]["why"])))
    if report["free_dedicated_mb"] is not None or report["overflow_mb"] is not None:
        free = report["free_dedicated_mb"] or 0
        over = report["overflow_mb"] or 0
        facts.append(("formula", f"free {free} MiB + overflow {over} MiB = {free + over} MiB"
                                 f" → {report['formula_mb']} MiB (clamped to [0, card − CUDA context], down to 64 MiB)"))
    bound = report["vram_total_mb"]
    if bound is not None:
        facts.append(("card", f"{bound} MiB, CUDA context {report['cuda_context_mb']} MiB"
                              + (f", clamped by {report['clamped_by']}" if report["clamped_by"] else "")))
    facts.append(("observations", f"{report['observations']} used of {report['recorded']} recorded"))
    tuning = report.get("tuning")
    probes: list[dict[str, Any]] = []
    if tuning:
        best = tuning.get("best")
        state = "closed" if tuning["closed"] else "open"
        text = tuning["reason"] if tuning["reason"].startswith(state) else f"{state}: {tuning['reason']}"
        if best:
            text += (f"; best: {best['road']}" + (f" with {best['reserve_mb']} MiB" if best["road"] == "resident" else "")
                     + f" at {best['sit']:.3f} s/it")
        facts.append(("tuning", text))
        probes = tuning.get("probes") or []
    lines.append(render.table(("", ""), facts, show_header=False, no_wrap=(0,)))
    if probes:
        lines.append("")
        rows = [(p["road"], p["reserve_mb"], "-" if p["sit"] is None else f"{p['sit']:.3f}", p["runs"],
                 "ok" if p["ok"] else p["reason"], "swings" if p["unstable"] else "")
                for p in probes]
        lines.append(render.table(("road", "reserve MiB", "s/it", "runs", "result", ""), rows, no_wrap=(0, 1, 2, 3),
                                  right=(1, 2, 3)))
    used = report["used"][-RECENT_ROWS:]
    if used:
        lines.append("")
        rows = [(time.strftime("%Y-%m-%d %H:%M", time.localtime(o["time"])), o["source"],
                 _ckpt_name(o["checkpoint"]) if o["checkpoint"] else "(WebUI-wide)", _mb(o["free_mb"]),
                 _mb(o["overflow_mb"]), _mb(o["reserve_mb"])) for o in used]
        lines.append(render.table(("when", "source", "checkpoint", "free", "overflow", "reserve"), rows,
                                  no_wrap=(3, 4, 5), right=(3, 4, 5)))
    return "\n".join(lines)


def reserve_cmd(  # noqa: PLR0917 - one parameter per CLI option
    webui: WebuiOpt = None,
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", metavar="NAME",
        help="A checkpoint file name (default: the WebUI's selected one; with --add: WebUI-wide).")] = None,
    add: Annotated[bool, typer.Option("--add", help="Record a manual reading (Task Manager) instead.")] = False,
    free_mb: Annotated[int | None, typer.Option(
        "--free-mb", min=0, metavar="N", help="With --add: free dedicated VRAM after the model loaded (MiB).")] = None,
    overflow_mb: Annotated[int | None, typer.Option(
        "--overflow-mb", min=0, metavar="M", help="With --add: shared GPU memory a large generation used (MiB).")] = None,
    sit: Annotated[float | None, typer.Option(
        "--sit", min=0.0, metavar="S", help="With --add: seconds per iteration you measured.")] = None,
    facts_file: FactsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the layout reserve lowvram computes from this WebUI's observations, or record a reading.

    The reserve is the VRAM set aside for each generation when the model is kept in VRAM (where VRAM
    can spill into RAM: Windows, WSL2); the screen says whether the plan uses it.

    \b
    Examples:
      lowvram reserve --webui ~/stable-diffusion-webui
      lowvram reserve --add --free-mb 600 --overflow-mb 1000
    """
    from lowvram.cli import render
    from lowvram.core.observations import Observation, observation_to_dict
    from lowvram.world import paths
    from lowvram.world.observation_log import append_observation, load_observations

    if not add and (free_mb is not None or overflow_mb is not None or sit is not None):
        raise UsageError("--free-mb, --overflow-mb and --sit go with --add",
                         "lowvram reserve --add --free-mb N --overflow-mb M")
    if add and (free_mb is None or overflow_mb is None):
        raise UsageError("--add needs both --free-mb and --overflow-mb",
                         "read them in Task Manager (Performance → GPU): dedicated free after the model loaded, "
                         "shared used during a large generation")
    root = _find_webui(webui)
    facts = _gather(root, facts_file)
    obs_path = paths.observations_path(root)
    loaded = load_observations(obs_path)
    observations = list(loaded.items)
    warnings = list(loaded.warnings)

    added: Observation | None = None
    if add:
        key: str | None = None
        if checkpoint:
            key = resolve_checkpoint(checkpoint, root, facts, observations)
            if key is None:
                raise WebuiError(f"checkpoint {checkpoint} is not under {root / 'models' / 'Stable-diffusion'}",
                                 "give the checkpoint's file name as the UI lists it, or leave --checkpoint out "
                                 "for a WebUI-wide reading")
        vram_total, driver = _gpu(facts)
        added = Observation(time=time.time(), source="manual", checkpoint=key, free_mb=free_mb,
                            overflow_mb=overflow_mb, overflow_source="manual", sit=sit, vram_total_mb=vram_total,
                            driver=driver, family=facts.webui.model_family if facts.webui else None,
                            gpu_uuid=_gpu_uuid(facts))
        append_observation(obs_path, added)
        observations.append(added)
        selected = key or (facts.webui.checkpoint_key if facts.webui else None)
    elif checkpoint:
        selected = resolve_checkpoint(checkpoint, root, facts, observations)
        if selected is None:
            warnings.append(f"no observations of {checkpoint} yet and no such file under models/Stable-diffusion")
    else:
        selected = facts.webui.checkpoint_key if facts.webui else None

    report = reserve_report(root, selected, facts, observations, warnings)
    report["plan"] = plan_use(root, facts, facts_file)
    if added is not None:
        report["added"] = observation_to_dict(added)
    if as_json:
        render.emit_json(report)
        return
    for w in warnings:
        render.warn(w)
    if added is not None:
        scope = f"for {_ckpt_name(added.checkpoint)}" if added.checkpoint else "WebUI-wide (every checkpoint)"
        print(f"recorded {scope}: free {free_mb} MiB, overflow {overflow_mb} MiB"
              + (f", {sit} s/it" if sit is not None else ""))
        print()
    print(render_report(report))
