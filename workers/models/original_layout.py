"""Write a diffusers Stable Diffusion pipeline as one original-layout (CompVis/LDM) `.safetensors` checkpoint.

diffusers only converts the other way (single_file_utils: original → diffusers). Production single-file bases
(`48.safetensors` from a trainer or a model shop) come in this layout, so the demo needs one it can build
offline; this is the exact inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`
and `convert_ldm_clip_checkpoint`, checked by loading the result back with `from_single_file`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class UnsupportedLayout(ValueError):
    """A diffusers weight with no place in the original layout: exporting it would silently drop it."""


def _rename_head(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, layers_per_block: int, up_attention_blocks: set[int]) -> str:
    """One UNet2DConditionModel weight name → its `input_blocks/middle_block/output_blocks` name."""
    per_block = layers_per_block + 1
    for new, old in _UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_rename_head(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in up_attention_blocks else 1
        return f"output_blocks.{block * per_block + layers_per_block}.{slot}.conv.{m[2]}"
    raise UnsupportedLayout(f"UNet weight {key!r} has no place in the original single-file layout")


def vae_key(key: str, num_up_blocks: int) -> str:
    """One AutoencoderKL weight name → its `encoder.down.N.block.M` / `decoder.up.N…` name."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv keep their names
    rest = _rename_head(rest, _VAE_FIXED)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        rest = f"down.{m[1]}.block.{m[2]}.{m[3]}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        rest = f"up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        rest = f"up.{num_up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        rest = "mid.attn_1." + _rename_head(m[1], _VAE_ATTENTION)
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    return f"{side}.{rest}"


def original_state_dict(pipe: Any) -> dict[str, Any]:
    """Every weight of a StableDiffusionPipeline (UNet, VAE, CLIP text encoder) under its original name."""
    unet_config = pipe.unet.config
    up_attention_blocks = {i for i, kind in enumerate(unet_config.up_block_types) if "CrossAttn" in kind}
    out: dict[str, Any] = {}
    for key, tensor in pipe.unet.state_dict().items():
        out[UNET_PREFIX + unet_key(key, unet_config.layers_per_block, up_attention_blocks)] = tensor
    num_up = len(pipe.vae.config.up_block_types)
    for key, tensor in pipe.vae.state_dict().items():
        name = vae_key(key, num_up)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor[:, :, None, None]  # the original attention projections are 1×1 convolutions
        out[VAE_PREFIX + name] = tensor
    for key, tensor in pipe.text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") or key.startswith("text_projection") else "text_model." + key
        out[CLIP_PREFIX + name] = tensor
    return out


def save_original_checkpoint(pipe: Any, path: Path) -> Path:
    """One `.safetensors` file in the original layout; tensors are made contiguous copies so none share storage."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in original_state_dict(pipe).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
