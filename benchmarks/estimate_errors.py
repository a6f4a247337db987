"""The estimator's errors on its reference figures, calibration and validation apart, per family.

The UNet's working memory is the architecture's count (lowvram.core.estimate.memory.derived_unet_act) times
one scale fitted on the rows of lowvram/data/estimate_reference.json marked "calibration"; the rows marked
"validation" never enter the fit. This prints the fit (and the scale shipped in memory.UNET_ACT_FIT), then
the median and worst absolute relative error of each family on each set, and with --rows every row.

    .venv/bin/python benchmarks/estimate_errors.py [--rows]

ComfyUI's per-model factors are printed as a cross-check only (not a target). Then the DiT/weight-format rows
("dit": Flux-dev on diffusers' L40 benchmark, GGUF and NF4 file sizes): each constant refitted on the one
calibration row it comes from beside the shipped value, and every row's error per set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowvram.core.estimate import dit
from lowvram.core.estimate import format_choice as fc
from lowvram.core.estimate import memory as est
from lowvram.core.estimate import reference as ref
from lowvram.core.estimate.formats import FORMATS

REFERENCE = Path(__file__).resolve().parents[1] / "lowvram" / "data" / "estimate_reference.json"
# comfy/supported_models.py memory_usage_factor × comfy/model_base.py memory_required (area × bytes × 0.01 MiB):
# elements per latent pixel; VAE decode 2178 elements per output pixel (comfy/sd.py).
COMFY = {"sd15": 1.0 * 0.01 * 2**20, "sdxl": 0.8 * 0.01 * 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="store_true", help="print every reference row's error too")
    args = parser.parse_args()
    points = ref.reference_points(json.loads(REFERENCE.read_text(encoding="utf-8")))
    fit = ref.fit_act_scale(points)
    print(f"fitted on {sum(p.set == 'calibration' for p in points)} calibration rows: scale {fit:.4f} "
          f"(shipped UNET_ACT_FIT {est.UNET_ACT_FIT}); validated on {sum(p.set == 'validation' for p in points)} "
          "held-out rows")
    print("UNet working memory, elements per latent pixel per batch element (derived × scale; ComfyUI's factor):")
    for fam, levels in est.UNET_LEVELS.items():
        comfy = f"{COMFY[fam]:.0f}" if fam in COMFY else "-"
        print(f"  {fam:13} {est.derived_unet_act(levels):6.0f} × {est.UNET_ACT_FIT} = "
              f"{est.DEFAULT_COEFFICIENTS.unet_act[fam]:6.0f}   (ComfyUI {comfy})")
    print(f"VAE decode, elements per output pixel: {est.DEFAULT_COEFFICIENTS.vae_decode} (ComfyUI 2178)")
    print(f"{'family':7} {'set':12} {'rows':>4} {'median':>7} {'worst':>7}  worst row")
    for s in ref.error_summary(points):
        print(f"{s.family:7} {s.set:12} {s.rows:4d} {s.median:7.1%} {s.worst:7.1%}  {s.worst_label}")
    if args.rows:
        for p in points:
            co = est.DEFAULT_COEFFICIENTS
            print(f"  {p.set:12} {p.family:5} {p.label:48} measured {p.measured_mb:8.1f} MiB "
                  f"predicted {p.predict(co):8.1f} MiB  {p.error(co):+.1%}")
    _print_dit(json.loads(REFERENCE.read_text(encoding="utf-8")))
    return 0


def _print_dit(data: dict[str, object]) -> None:
    """The DiT/format rows: each constant against the calibration row it is fitted on, then every row's error."""
    fit = ref.fit_dit_constants(data)
    shipped = {"act_fit": dit.DIT_ACT_FIT, "matmul_efficiency": fc.MATMUL_EFFICIENCY,
               "pcie_efficiency": fc.PCIE_EFFICIENCY, "nf4_dequant": FORMATS["nf4"].dequant,
               "fp8_dequant": FORMATS["fp8_e4m3fn"].dequant,
               "kept_high_params": dit.SPECS["flux1-dev"].kept_high_params}
    print("\nDiT and weight formats (Flux-dev): each constant refitted on its one calibration row, and shipped:")
    for name, value in shipped.items():
        print(f"  {name:18} fitted {getattr(fit, name):12.4g}   shipped {value:12.4g}")
    points = ref.dit_points(data)
    co = est.DEFAULT_COEFFICIENTS
    for s in ref.SETS:
        rows = [p for p in points if p.set == s]
        errs = sorted(abs(p.error(co)) for p in rows)
        print(f"{s}: {len(rows)} rows, median {errs[len(errs) // 2]:.1%}, worst {errs[-1]:.1%}")
        for p in rows:
            print(f"  {p.label:36} measured {p.measured_mb:9.3f} {p.unit:3} predicted {p.predict(co):9.3f} "
                  f"{p.unit:3} {p.error(co):+.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
