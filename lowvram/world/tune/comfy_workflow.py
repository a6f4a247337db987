"""The workflow `lowvram tune` runs on ComfyUI, from the plan's model file (docs/architecture.md#tune).

A single-file checkpoint in models/checkpoints: CheckpointLoaderSimple, as shared/tools/real-comfy/gen.py.
A diffusion-model-only file in models/unet or models/diffusion_models (a FLUX.1 or SD3 download, a GGUF):
the separate loaders ComfyUI's own examples use, with the files found beside it:

- the model: UNETLoader (weight_dtype "default"), or ComfyUI-GGUF's UnetLoaderGGUF for a `.gguf`
  (refused where custom_nodes/ComfyUI-GGUF is missing; the running ComfyUI's /object_info is checked too);
- the text encoders the family needs, from models/text_encoders and models/clip (ComfyUI's
  "text_encoders" folders): FLUX.1 T5-XXL + CLIP-L (DualCLIPLoader, type "flux"); SD3/SD3.5 CLIP-L +
  CLIP-G (DualCLIPLoader, type "sd3"), + T5-XXL where there is one (TripleCLIPLoader); SDXL CLIP-L + CLIP-G
  (type "sdxl"); SD 1.5 CLIP-L (CLIPLoader). A `.gguf` encoder (ComfyUI-GGUF only) takes the GGUF loader;
- the VAE from models/vae whose latent channels fit the family (16 for FLUX.1 and SD3, 4 for SD);
- EmptySD3LatentImage for the 16-channel families, cfg 1.0 for FLUX.1 (guidance-distilled).

Which file is which: a safetensors header is read (never the weights) and told apart as ComfyUI's
comfy/sd.py detect_te_model does: `text_model.encoder.layers.30.mlp.fc1.weight` is CLIP-G,
`...layers.22...` CLIP-H (not used), `...layers.0...` CLIP-L, `encoder.block.23.layer.1.DenseReluDense.wi_1`
with 4096 inputs (or the older `wi`) T5-XXL; a VAE by `decoder.conv_in.weight`'s input channels. Only
where the header says nothing (a `.gguf`, a pickle, a damaged file) the name decides: "t5" and "xxl",
"clip_g"/"clip-g", "clip_l"/"clip-l"; "ae." (FLUX.1's VAE) or "vae" with the family's name. Of several
files of one kind the newest is used (as the plan picks the model); tune says which it used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram.core.errors import LowvramError
from lowvram.core.model_files import FAMILY_NAMES
from lowvram.world.tune.results import NEGATIVE, PROMPT, SEED, TuneError

GGUF_NODE_DIR = "comfyui-gguf"  # custom_nodes/ComfyUI-GGUF (city96), compared lower-cased
MAX_FILES = 4096  # files looked at per folder: a bound on a huge models tree
# ComfyUI's folder_paths.supported_pt_extensions, and .gguf where ComfyUI-GGUF adds it.
SUFFIXES = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
ENCODER_WORDS = {"t5xxl": "T5-XXL", "clip_l": "CLIP-L", "clip_g": "CLIP-G"}


@dataclass(frozen=True)
class Recipe:
    encoders: tuple[str, ...]  # what the family needs, in the loader's order
    optional: tuple[str, ...]  # used where found (SD3's T5-XXL)
    clip_type: str  # CLIPLoader/DualCLIPLoader's type
    latent_channels: int
    cfg: float
    scheduler: str


_FLUX = Recipe(("t5xxl", "clip_l"), (), "flux", 16, 1.0, "simple")
_SD3 = Recipe(("clip_l", "clip_g"), ("t5xxl",), "sd3", 16, 4.5, "simple")
RECIPES = {"flux1-dev": _FLUX, "flux1-schnell": _FLUX, "sd3-medium": _SD3, "sd3.5-medium": _SD3,
           "sd3.5-large": _SD3, "sdxl": Recipe(("clip_l", "clip_g"), (), "sdxl", 4, 7.0, "normal"),
           "sd15": Recipe(("clip_l",), (), "stable_diffusion", 4, 7.0, "normal")}


@dataclass(frozen=True)
class ModelSource:
    """What the workflow loads: a single-file checkpoint, or a diffusion model with its encoders and VAE."""

    model: str  # as ComfyUI names it: relative to models/checkpoints, or to models/unet|diffusion_models
    single_file: bool = True
    family: str | None = None
    encoders: tuple[str, ...] = ()
    vae: str | None = None

    @property
    def gguf(self) -> bool:
        return self.model.lower().endswith(".gguf")

    def words(self) -> str:
        """The loaders as the user would read them in tune's output."""
        if self.single_file:
            return f"CheckpointLoaderSimple {self.model}"
        graph = self.nodes()
        return (f"{graph['1']['class_type']} {self.model}, {graph['8']['class_type']} {' + '.join(self.encoders)}, "
                f"VAELoader {self.vae}")

    def nodes(self) -> dict[str, dict[str, Any]]:
        """The loader nodes: "1" the model (output 0), "8" the text encoders, "9" the VAE (none for a checkpoint)."""
        if self.single_file:
            return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": self.model}}}
        recipe = RECIPES[self.family or ""]
        model: dict[str, Any] = ({"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": self.model}} if self.gguf
                                 else {"class_type": "UNETLoader", "inputs": {"unet_name": self.model,
                                                                              "weight_dtype": "default"}})
        gguf = "GGUF" if any(e.lower().endswith(".gguf") for e in self.encoders) else ""
        if len(self.encoders) == 1:
            clip = {"class_type": f"CLIPLoader{gguf}", "inputs": {"clip_name": self.encoders[0],
                                                                  "type": recipe.clip_type}}
        elif len(self.encoders) == 2:
            clip = {"class_type": f"DualCLIPLoader{gguf}", "inputs": {
                "clip_name1": self.encoders[0], "clip_name2": self.encoders[1], "type": recipe.clip_type}}
        else:
            clip = {"class_type": f"TripleCLIPLoader{gguf}",
                    "inputs": {f"clip_name{i + 1}": name for i, name in enumerate(self.encoders)}}
        return {"1": model, "8": clip, "9": {"class_type": "VAELoader", "inputs": {"vae_name": self.vae}}}


def workflow(source: ModelSource, width: int, height: int, steps: int, prefix: str) -> dict[str, Any]:
    """One image at tune's size and steps, a fixed seed: shared/tools/real-comfy/gen.py's graph, or the
    separate loaders' graph for a diffusion-model-only file."""
    graph = source.nodes()
    recipe = RECIPES.get(source.family or "") if not source.single_file else None
    clip, vae = (["1", 1], ["1", 2]) if recipe is None else (["8", 0], ["9", 0])
    latent = "EmptySD3LatentImage" if recipe is not None and recipe.latent_channels == 16 else "EmptyLatentImage"
    cfg, scheduler = (7.0, "normal") if recipe is None else (recipe.cfg, recipe.scheduler)
    graph.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": clip}},
        "4": {"class_type": latent, "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": SEED,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": vae}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    })
    return graph


def has_gguf_nodes(tree: Path) -> bool:
    """custom_nodes/ComfyUI-GGUF is there (its loaders then list .gguf files)."""
    try:
        return any(p.is_dir() and p.name.lower() == GGUF_NODE_DIR for p in (tree / "custom_nodes").iterdir())
    except OSError:
        return False


def _files(folders: list[Path], suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name as ComfyUI lists it, path) of the model files under `folders`, the first folder's name winning."""
    out: dict[str, Path] = {}
    for folder in folders:
        seen = 0
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                seen += 1
                if seen > MAX_FILES:
                    break
                if name.lower().endswith(suffixes):
                    path = Path(dirpath) / name
                    out.setdefault(path.relative_to(folder).as_posix(), path)
    return list(out.items())


def _header(path: Path) -> dict[str, Any] | None:
    if not path.name.lower().endswith((".safetensors", ".sft")):
        return None
    from lowvram.world.detect.checkpoint import read_safetensors_header

    try:
        return read_safetensors_header(path)
    except (LowvramError, OSError):
        return None


def _shape(header: dict[str, Any], key: str) -> list[int] | None:
    """The shape of `key`, under any prefix (a file saved from a checkpoint keeps its prefix)."""
    for name, entry in header.items():
        if (name == key or name.endswith("." + key)) and isinstance(entry, dict):
            shape = entry.get("shape")
            return [d for d in shape if isinstance(d, int)] if isinstance(shape, list) else []
    return None


def encoder_kind(header: dict[str, Any] | None, name: str) -> str | None:
    """t5xxl, clip_l, clip_g or None: the header as ComfyUI's detect_te_model reads it, else the name."""
    if header:
        if _shape(header, "text_model.encoder.layers.30.mlp.fc1.weight") is not None:
            return "clip_g"
        if _shape(header, "text_model.encoder.layers.22.mlp.fc1.weight") is not None:
            return None  # CLIP-H: no family here uses it
        if _shape(header, "text_model.encoder.layers.0.mlp.fc1.weight") is not None:
            return "clip_l"
        wi = _shape(header, "encoder.block.23.layer.1.DenseReluDense.wi_1.weight")
        if (wi and wi[-1] == 4096) or _shape(header, "encoder.block.23.layer.1.DenseReluDense.wi.weight") is not None:
            return "t5xxl"
        if any(k != "__metadata__" for k in header):
            return None  # a header that names its tensors said what it is: not one of these
    low = name.lower().replace("-", "_")
    if "t5" in low and "xxl" in low:
        return "t5xxl"
    return "clip_g" if "clip_g" in low else "clip_l" if "clip_l" in low else None


def vae_fits(header: dict[str, Any] | None, name: str, family: str, channels: int) -> bool:
    """A VAE with `channels` latent channels (decoder.conv_in's inputs); by name only where no header says it."""
    if header:
        shape = _shape(header, "decoder.conv_in.weight")
        if shape is not None:
            return len(shape) > 1 and shape[1] == channels
    low = Path(name).name.lower()
    if family.startswith("flux"):
        return low.startswith("ae.") or ("flux" in low and "vae" in low)
    return "vae" in low and (family.startswith("sd3") == ("sd3" in low))


def _newest(items: list[tuple[str, Path]]) -> str:
    def mtime(item: tuple[str, Path]) -> float:
        try:
            return item[1].stat().st_mtime
        except OSError:
            return 0.0
    return max(items, key=lambda item: (mtime(item), item[0]))[0]


def _model_folder(tree: Path, path: Path) -> tuple[str, str] | None:
    """(folder kind, name relative to it) where the model file sits in ComfyUI's own folders."""
    where = path.parent.resolve() / path.name  # the file itself may be a link
    for kind, folders in (("checkpoints", ("checkpoints",)), ("diffusion_models", ("unet", "diffusion_models"))):
        for folder in folders:
            base = (tree / "models" / folder).resolve()
            if base in where.parents:
                return kind, where.relative_to(base).as_posix()
    return None


def model_source(tree: Path, webui: Any, family: str | None) -> ModelSource:
    """The plan's model as the workflow loads it, with the files it needs; one TuneError line when a
    file is missing, before anything starts."""
    name = webui.checkpoint if webui is not None else None
    path = Path(webui.checkpoint_path) if webui is not None and webui.checkpoint_path else None
    found = _model_folder(tree, path) if path is not None else None
    if not name or found is None:
        raise TuneError("tune runs a model file from ComfyUI's models/checkpoints, models/unet or "
                        "models/diffusion_models, and the plan names " + (f"{name}, which is not there" if name
                                                                           else "none"),
                        "put the model you run in one of those folders (tune does not read extra_model_paths.yaml)")
    kind, rel = found
    if kind == "checkpoints":
        return ModelSource(rel)
    return _diffusion_source(tree, rel, family)


def _diffusion_source(tree: Path, rel: str, family: str | None) -> ModelSource:
    recipe = RECIPES.get(family or "")
    title = FAMILY_NAMES.get(family or "", family or "unknown")
    if recipe is None:
        raise TuneError(f"tune builds the workflow for a diffusion-model-only FLUX.1, SD3/SD3.5, SDXL or SD 1.5 "
                        f"file, and {rel} is {title}", "put a single-file checkpoint in models/checkpoints to tune "
                                                       "with it, or pass --model if the family was misread")
    gguf_nodes = has_gguf_nodes(tree)
    if rel.lower().endswith(".gguf") and not gguf_nodes:
        raise TuneError(f"{rel} is a GGUF file and ComfyUI has no GGUF loader: custom_nodes/ComfyUI-GGUF is not "
                        "installed", "install city96's ComfyUI-GGUF (and its `gguf` package) in ComfyUI, as you "
                                     "would to run this file")
    models = tree / "models"
    suffixes = (*SUFFIXES, ".gguf") if gguf_nodes else SUFFIXES
    by_kind: dict[str, list[tuple[str, Path]]] = {}
    for te_name, te_path in _files([models / "text_encoders", models / "clip"], suffixes):
        te_kind = encoder_kind(_header(te_path), te_name)
        if te_kind is not None:
            by_kind.setdefault(te_kind, []).append((te_name, te_path))
    vaes = [(n, p) for n, p in _files([models / "vae"], SUFFIXES)
            if vae_fits(_header(p), n, family or "", recipe.latent_channels)]
    missing = [ENCODER_WORDS[k] + " text encoder" for k in recipe.encoders if k not in by_kind]
    if not vaes:
        missing.append(f"{recipe.latent_channels}-channel VAE" + (" (ae.safetensors)" if recipe.cfg == 1.0 else ""))
    if missing:
        no_encoder, no_vae = any("encoder" in m for m in missing), not vaes
        where = ("models/text_encoders (or models/clip) and models/vae" if no_encoder and no_vae
                 else "models/vae" if no_vae else "models/text_encoders or models/clip")
        raise TuneError(f"tune cannot build the {title} workflow for {rel}: no {' and no '.join(missing)} in {where}",
                        f"put the files ComfyUI's own {title} workflow loads there (tune reads their headers, else "
                        "their names: t5xxl…, clip_l…, clip_g…, ae.safetensors)")
    encoders = tuple(_newest(by_kind[k]) for k in (*recipe.encoders, *recipe.optional) if k in by_kind)
    return ModelSource(rel, single_file=False, family=family, encoders=encoders, vae=_newest(vaes))
