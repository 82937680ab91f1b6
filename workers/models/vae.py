"""An optional VAE component, published like a LoRA and named in the release: `model@base-v1+vae-v1`.

The reason is SDXL's VAE, which overflows in float16: an fp16-safe VAE (a diffusers `AutoencoderKL` folder) is
published once as component `vae` and every release that names it decodes with it, without a new base version.
Releases that differ only in their LoRA still share one pipeline; a different VAE is a different pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cachemgr import ComponentRef, SnapshotStore

from .detect import PICKLED_SUFFIXES, LayoutError, precision, read_header, read_json
from .layouts import VersionPlan

VAE_CLASS = "AutoencoderKL"
VAE_FAMILIES = ("sd", "sd2", "sdxl", "single-file")
"""Families whose pipeline decodes with one AutoencoderKL that a published VAE may replace."""


def plan_vae_folder(root: Path) -> VersionPlan:
    """A diffusers AutoencoderKL folder (config.json + safetensors weights) as a `vae` version; refused otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder; a vae version is a diffusers AutoencoderKL folder "
                          "(config.json + diffusion_pytorch_model.safetensors)")
    config = root / "config.json"
    if not config.is_file():
        raise LayoutError(f"{root.name} has no config.json; a vae version is a diffusers AutoencoderKL folder")
    name = read_json(config).get("_class_name")
    if name != VAE_CLASS:
        raise LayoutError(f"{root.name}/config.json describes {name or 'no class'}, not {VAE_CLASS}; "
                          "publish a VAE folder as component 'vae'")
    plan = VersionPlan("vae", "vae", "vae")
    plan.files["config.json"] = config
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.name != "config.json"):
        if path.suffix in PICKLED_SUFFIXES:
            raise LayoutError(f"{path.name} is a pickle; convert it to safetensors first "
                              "(only safetensors are ever loaded)")
        if path.suffix == ".safetensors":
            plan.files[path.name] = path
            plan.precision[path.name] = precision(read_header(path))
        else:
            plan.skipped.append(path.name)
    if len(plan.precision) == 0:
        raise LayoutError(f"{root.name} holds no .safetensors weights; convert the VAE to safetensors first")
    plan.meta.update(family="vae", layout="vae", precision=plan.precision)
    return plan


def check_vae_boots(plan: VersionPlan) -> None:
    """Every weight the AutoencoderKL built from the config expects is in the files, with its shape."""
    from .skeleton import expected_shapes

    expected = expected_shapes(plan.files["config.json"].parent, "diffusers", VAE_CLASS)
    for rel in plan.precision:
        found = {k: tuple(t.shape) for k, t in read_header(plan.files[rel]).items()}
        missing = [k for k in expected if k not in found]
        wrong = [k for k in expected if k in found and found[k] != expected[k]]
        if missing or wrong:
            key = (missing or wrong)[0]
            raise LayoutError(f"{rel} does not fit its config.json ({len(missing)} weights missing, {len(wrong)} of "
                              f"another shape, e.g. {key}); the files do not belong to this config")


def load_vae(pipe: Any, store: SnapshotStore, ref: ComponentRef, torch_dtype: Any) -> None:
    """Replace the pipeline's VAE with the published one, from L2 only."""
    from diffusers import AutoencoderKL

    if not hasattr(pipe, "vae"):
        raise LayoutError(f"{ref}: this pipeline has no VAE to replace")
    vae = AutoencoderKL.from_pretrained(str(store.path(ref)), torch_dtype=torch_dtype, local_files_only=True,
                                        use_safetensors=True)
    pipe.register_modules(vae=vae)
