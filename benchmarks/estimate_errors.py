"""The estimator's errors on its reference figures, calibration and validation apart, per family.

The UNet's working memory is the architecture's count (lowvram.core.estimate.memory.derived_unet_act) times
one scale fitted on the rows of lowvram/data/estimate_reference.json marked "calibration"; the rows marked
"validation" never enter the fit. This prints the fit (and the scale shipped in memory.UNET_ACT_FIT), then
the median and worst absolute relative error of each family on each set, and with --rows every row.

    .venv/bin/python benchmarks/estimate_errors.py [--rows]

ComfyUI's per-model factors are printed as a cross-check only (not a target).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowvram.core.estimate import memory as est
from lowvram.core.estimate import reference as ref

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
