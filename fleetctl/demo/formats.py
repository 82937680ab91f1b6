"""The tiny demo models in the shapes users bring them: kohya/A1111 and PEFT LoRAs, SDXL as one SGM-layout file,
diffusers folders with fp16 variants or hub clutter. Built offline from seeded random weights, like builders.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from workers.models.original_layout import original_state_dict

SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
PARTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}


def build_full_lora(base_dir: Path, family: str, seed: int, rank: int = 4) -> dict[str, Any]:
    """A non-zero LoRA on the UNet and every text encoder of a diffusers base: {part: (peft state dict, config)}."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    pipe = DiffusionPipeline.from_pretrained(base_dir, local_files_only=True, use_safetensors=True)
    torch.manual_seed(seed)
    out = {}
    for part in PARTS:
        module = getattr(pipe, part, None)
        if module is None:
            continue
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if part == "unet" else ["q_proj", "k_proj", "v_proj", "out_proj"]
        config = LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(config, module)
        state = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.2)
                    state[name.replace(".default.", ".")] = p.detach().clone()
        out[part] = (state, config)
    return out


def save_diffusers_lora(lora: dict[str, Any], family: str, path: Path, name: str = "pytorch_lora_weights.safetensors") -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {}
    for part, (state, config) in lora.items():
        key = "unet" if part == "unet" else part
        kwargs[f"{key}_lora_layers"] = state
        kwargs[f"{key}_lora_adapter_metadata"] = config.to_dict()
    path.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(path, weight_name=name, safe_serialization=True, **kwargs)
    return path / name


def save_kohya_lora(lora: dict[str, Any], path: Path) -> Path:
    """The same weights under kohya/A1111 names: `lora_unet_…`, `lora_te1_…`, `lora_te2_…`, `.lora_down/.lora_up`
    and a per-module `.alpha`."""
    from safetensors.torch import save_file

    tensors = {}
    for part, (state, config) in lora.items():
        for key, value in state.items():
            module, _, kind = key.rpartition(".lora_")
            if part != "unet" and not module.startswith("text_model."):
                module = "text_model." + module
            stem = f"lora_{PARTS[part]}_" + module.replace(".", "_")
            tensors[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous().clone()
            tensors[f"{stem}.alpha"] = torch.tensor(float(config.lora_alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def save_peft_folder(lora: dict[str, Any], path: Path) -> Path:
    """A PEFT adapter folder of the UNet part, as `peft_model.save_pretrained` writes one (with a README)."""
    from safetensors.torch import save_file

    state, config = lora["unet"]
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
    data = config.to_dict()
    data["target_modules"] = sorted(data["target_modules"])
    (path / "adapter_config.json").write_text(json.dumps(data, default=str))
    (path / "README.md").write_text("# a style LoRA\n")
    return path


def _open_clip_state(text_encoder: Any) -> dict[str, Any]:
    """CLIPTextModelWithProjection weights in OpenCLIP's names (the inverse of diffusers' convert_open_clip_checkpoint)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
             if not k.endswith("position_ids")}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"),
           "ln_final.bias": state.pop("final_layer_norm.bias"),
           }
    if "text_projection.weight" in state:  # SDXL's second encoder; SD 2.x's CLIPTextModel has no projection
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        head, _, rest = key.removeprefix("encoder.layers.").partition(".")
        layers.setdefault(head, {})[rest] = value
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i, parts in layers.items():
        block = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat([parts.pop(f"self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key, value in parts.items():
            stem, _, kind = key.rpartition(".")
            out[block + f"{names[stem]}.{kind}"] = value
    return out


def save_sdxl_original_checkpoint(pipe: Any, path: Path, dtype: Any = None) -> Path:
    """An SDXL pipeline as one SGM-layout file, as SDXL checkpoints ship (`48.safetensors`)."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in original_state_dict(pipe).items():
        tensors[key.replace("cond_stage_model.transformer.", SDXL_CLIP_PREFIX)] = value
    for key, value in _open_clip_state(pipe.text_encoder_2).items():
        tensors[SDXL_OPENCLIP_PREFIX + key] = value
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def save_fp16_variant(folder: Path, keep_fp32: bool) -> Path:
    """Add `*.fp16.safetensors` beside each weight file of a diffusers folder (and drop the fp32 ones unless kept)."""
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.rglob("*.safetensors")):
        if ".fp16." in f.name:
            continue
        save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(f.with_name(f.stem + ".fp16.safetensors")))
        if not keep_fp32:
            f.unlink()
    return folder


def add_hub_clutter(folder: Path) -> Path:
    """What a hub download brings beside the model: docs, images, git attributes, a pickled twin of a weight file."""
    (folder / "README.md").write_text("---\nlicense: openrail\n---\n# model card\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / "sample.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return folder


def copy_without_weights(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    return dest


def original_shapes(config: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of an original-layout checkpoint of the pipeline `config` describes, from its
    modules built on the meta device (no memory, no weights)."""
    from types import SimpleNamespace

    from workers.models.skeleton import meta_module

    index = json.loads((config / "model_index.json").read_text())
    parts = {name: meta_module(config / name, spec[0], spec[1]) for name, spec in index.items()
             if name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    pipe = SimpleNamespace(**parts)
    names = original_state_dict(pipe)
    if "text_encoder_2" in parts:  # SDXL: the first encoder sits under conditioner.embedders.0, the second is OpenCLIP
        names = {k.replace("cond_stage_model.transformer.", SDXL_CLIP_PREFIX): v for k, v in names.items()}
        names.update({SDXL_OPENCLIP_PREFIX + k: v for k, v in _open_clip_state(parts["text_encoder_2"]).items()})
    elif parts["text_encoder"].config.hidden_size != 768:  # SD 2.x: OpenCLIP names under cond_stage_model.model
        names = {k: v for k, v in names.items() if not k.startswith("cond_stage_model.transformer.")}
        names.update({"cond_stage_model.model." + k: v for k, v in _open_clip_state(parts["text_encoder"]).items()})
    return {k: tuple(v.shape) for k, v in names.items()}


def save_sparse_checkpoint(shapes: dict[str, tuple[int, ...]], path: Path, dtype: str = "F16") -> Path:
    """A safetensors file with these tensors, all zero, written as a header and a sparse hole: a real-size SDXL file
    costs a few MB of disk and no time. Zeros are valid fp16/fp32 values, so the file loads."""
    import struct

    width = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        n = width
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return path
