"""A base the user had as one full checkpoint file (`48.safetensors`), as trainers and model shops ship them.

`warmfleet publish` converts such a file once, with diffusers' own `from_single_file` (workers/models/convert.py),
and publishes the diffusers folder it saves; the manifest meta says `layout: single-file` and, under
`converted_from`, the original file's name, size, sha256 and precision. A worker loads that folder with
`from_pretrained`, like any other: no conversion at boot.

Versions published before conversion at publish hold the file itself:

    <name>.safetensors   the whole model in the original (CompVis/LDM) key layout: UNet, VAE, text encoder(s)
    config/              a diffusers folder with configs, tokenizer and scheduler but no weights: the user's
                     (`publish --config DIR`) or the family's standard one, written at publish (workers/models/configs)

and a worker still loads them, with a plain `from_single_file(..., config=<config/>)`: offline only when given
that local folder (without it diffusers guesses the architecture and fetches configs from the hub). The
model_index.json (the folder's own, or config/'s) names the pipeline, Stable Diffusion or SDXL, so one family
serves both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cachemgr import SnapshotStore
from cachemgr.names import ComponentRef

from .base import LoadError, ModelBuilder, load_folder

CONFIG_FOLDER = "config"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def checkpoint_file(root: Path, meta: dict[str, Any]) -> Path:
    """The checkpoint the manifest names (meta "checkpoint"), else the one top-level .safetensors file."""
    if meta.get("checkpoint"):
        path = root / str(meta["checkpoint"])
        if path.parent != root or not path.name.endswith(".safetensors") or not path.is_file():
            raise LoadError(f"checkpoint {meta['checkpoint']!r} is not a top-level .safetensors file of {root}")
        return path
    found = sorted(root.glob("*.safetensors"))
    if len(found) != 1:
        raise LoadError(
            f"{root} holds {len(found)} top-level .safetensors files; a single-file base holds exactly one "
            "(or names it in its manifest meta as 'checkpoint')"
        )
    return found[0]


def pipeline_class(config: Path) -> Any:
    try:
        name = json.loads((config / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        raise LoadError(f"{config} has no readable model_index.json naming the pipeline") from None
    if name not in PIPELINES:
        raise LoadError(f"single-file bases of {name} are not supported; supported: {', '.join(PIPELINES)}")
    import diffusers

    return getattr(diffusers, name)


class SingleFile(ModelBuilder):
    family = "single-file"
    pipeline_class_name = "StableDiffusionPipeline"  # or SDXL: read from config/model_index.json

    @classmethod
    def accepts(cls, meta: dict[str, Any]) -> bool:
        """Published by `warmfleet publish` (layout single-file, family sd/sd2/sdxl) or by hand (family single-file)."""
        return meta.get("layout") == "single-file" or meta.get("family") == cls.family

    def load_pipeline(self, store: SnapshotStore, base: ComponentRef, torch_dtype: Any) -> Any:
        root = store.path(base)
        meta = store.manifest(base).meta
        if meta.get("converted_from"):  # converted at publish: a diffusers folder like any other
            return load_folder(pipeline_class(root), root, torch_dtype, self.variant)
        config = root / CONFIG_FOLDER
        if not config.is_dir():
            raise LoadError(f"{base} has no {CONFIG_FOLDER}/ folder: single-file bases are published with one")
        return pipeline_class(config).from_single_file(
            str(checkpoint_file(root, meta)), config=str(config), local_files_only=True, dtype=torch_dtype
        )
