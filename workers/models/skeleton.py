"""Will it boot? The pipeline's modules are built from their configs on the meta device (no memory, no weights
read), and every weight they expect is looked up, by name and shape, in the safetensors headers of the version.
A version that would fail at worker boot is refused at publish with one line instead."""

from __future__ import annotations

import json
from pathlib import Path

from .detect import LayoutError, read_header, read_json
from .layouts import CONFIG_FOLDER, VersionPlan, is_weights, variant_of
from .original_layout import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, UnsupportedLayout, unet_key, vae_key

WEIGHTED = {"unet", "vae", "text_encoder", "text_encoder_2", "prior", "decoder", "vqgan"}


def meta_module(folder: Path, library: str, class_name: str):  # noqa: ANN201 - a torch module on the meta device
    """One module of a pipeline built from its config.json on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, class_name, None)
    if cls is None:
        raise LayoutError(f"{folder.name}: class {library}.{class_name} is not available in this installation")
    with init_empty_weights():
        if library == "diffusers":
            model = cls.from_config(cls.load_config(folder))
        else:
            model = cls(cls.config_class.from_pretrained(folder))
    return model


def expected_shapes(folder: Path, library: str, class_name: str) -> dict[str, tuple[int, ...]]:
    """The weights one module built from its config.json expects, on the meta device."""
    model = meta_module(folder, library, class_name)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _compare(what: str, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], hint: str) -> None:
    missing = [k for k in expected if k not in found]
    if missing:
        raise LayoutError(f"{what} lacks {len(missing)} weight(s) its config needs (e.g. {missing[0]}); {hint}")
    for k, shape in expected.items():
        if tuple(found[k]) != shape and tuple(found[k]) != shape + (1, 1):
            raise LayoutError(f"{what}: {k} is {list(found[k])}, its config needs {list(shape)}; {hint}")


def _folder_weights(plan: VersionPlan, sub: str, variant: str | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for rel, path in plan.files.items():
        if rel.startswith(sub + "/") and rel.endswith(".safetensors") and variant_of(rel) == variant:
            shapes.update({k: t.shape for k, t in read_header(path).items()})
    return shapes


def check_diffusers(plan: VersionPlan) -> None:
    roots = ["prior", "decoder"] if plan.layout == "wuerstchen" else [""]
    for root in roots:
        prefix = f"{root}/" if root else ""
        index_path = plan.files.get(f"{prefix}model_index.json")
        if index_path is None:
            raise LayoutError(f"{prefix}model_index.json is missing; give the whole diffusers folder")
        index = read_json(index_path)
        variants = sorted({variant_of(r) for r in plan.files if r.startswith(prefix) and is_weights(r)}, key=str)
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name not in WEIGHTED:
                continue
            sub = prefix + name
            config = plan.files.get(f"{sub}/config.json")
            if config is None:
                raise LayoutError(f"{sub}/config.json is missing; give the whole diffusers folder")
            expected = expected_shapes(config.parent, spec[0], spec[1])
            for variant in variants:
                found = _folder_weights(plan, sub, variant)
                label = f"{sub} ({variant or 'plain'} weights)"
                if not found:
                    raise LayoutError(f"{label} has no .safetensors file though other parts have; publish every part "
                                      f"in {variant or 'plain'} precision or none")
                _compare(label, expected, found, "the files do not belong to this config")


def _original_unet(config: Path) -> dict[str, tuple[int, ...]]:
    cfg = json.loads((config / "config.json").read_text())
    expected = expected_shapes(config, "diffusers", "UNet2DConditionModel")
    ups = {i for i, kind in enumerate(cfg["up_block_types"]) if "CrossAttn" in kind}
    out = {}
    for k, shape in expected.items():
        try:
            out[UNET_PREFIX + unet_key(k, cfg["layers_per_block"], ups)] = shape
        except UnsupportedLayout:
            continue
    return out


def check_single_file(plan: VersionPlan) -> None:
    checkpoint = plan.files[plan.meta["checkpoint"]]
    found = {k: t.shape for k, t in read_header(checkpoint).items()}
    config_files = {**plan.files, **plan.generated}
    index = config_files.get(f"{CONFIG_FOLDER}/model_index.json")
    if index is None:
        raise LayoutError(f"{checkpoint.name}: no pipeline configs; pass --config DIR (a diffusers folder)")
    root = index.parent
    hint = "pass --config DIR with the diffusers configs this checkpoint was trained with"
    _compare(f"{checkpoint.name} (UNet)", _original_unet(root / "unet"), found, hint)
    vae_cfg = json.loads((root / "vae" / "config.json").read_text())
    vae = {VAE_PREFIX + vae_key(k, len(vae_cfg["up_block_types"])): s
           for k, s in expected_shapes(root / "vae", "diffusers", "AutoencoderKL").items()}
    _compare(f"{checkpoint.name} (VAE)", vae, found, hint)
    widths = {"sd": [(CLIP_PREFIX + "text_model.embeddings.token_embedding.weight", "text_encoder")],
              "sdxl": [("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                        "text_encoder"),
                       ("conditioner.embedders.1.model.token_embedding.weight", "text_encoder_2")],
              "sd2": [("cond_stage_model.model.token_embedding.weight", "text_encoder")]}
    for key, sub in widths.get(plan.family, []):
        width = json.loads((root / sub / "config.json").read_text())["hidden_size"]
        if key not in found:
            cut = ".transformer." if ".transformer." in key else ".model."
            prefix = key[:key.index(cut) + len(cut)]
            what = (f"lacks its {sub}'s token embedding ({key})" if any(k.startswith(prefix) for k in found)
                    else f"holds no {sub} weights (nothing under {prefix})")
            raise LayoutError(f"{checkpoint.name}: it {what}, which a {plan.family} checkpoint carries; publish the "
                              f"complete checkpoint, or {hint}")
        if found[key][-1] != width:
            raise LayoutError(f"{checkpoint.name}: its {sub} is {found[key][-1]} wide, the config says {width}; {hint}")


def check_boots(plan: VersionPlan) -> None:
    """Refuse, with one line, a version whose files would not load into its pipeline."""
    if plan.layout in ("diffusers", "wuerstchen"):
        check_diffusers(plan)
    elif plan.layout == "single-file":
        check_single_file(plan)

