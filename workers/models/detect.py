"""What a model file or folder is, read from safetensors headers and config JSON only: no weight is loaded.

Families: `sd` (Stable Diffusion 1.x), `sd2` (2.x), `sdxl` (SDXL base), `sdxl-refiner`, `wuerstchen`. A LoRA is
described by its key format (kohya/A1111, diffusers, PEFT), the parts it patches (UNet, text encoders) and the
width of the text embedding its cross-attention reads, which names the base architecture it was trained on.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
CLUTTER_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".yaml", ".yml", ".msgpack", ".h5", ".onnx",
                    ".onnx_data", ".pb", ".py", ".html")
CLUTTER_NAMES = (".gitattributes", ".gitignore", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")
FAMILIES = ("sd", "sd2", "sdxl", "sdxl-refiner", "wuerstchen")
FAMILY_NAMES = {"sd": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner",
                "wuerstchen": "Würstchen"}
CONTEXT_WIDTHS = {768: "sd", 1024: "sd2", 2048: "sdxl"}
"""The text-embedding width a real model's cross-attention reads (what a LoRA's attn2.to_k input width shows)."""
MAX_HEADER = 100 << 20
FLOAT_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


class LayoutError(ValueError):
    """Files that would not boot as given; refused at publish, before anything is uploaded."""


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, Tensor]:
    """Every tensor's dtype and shape; refuses a file that is not safetensors or is shorter than its header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            if not 0 < length <= min(MAX_HEADER, size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(fh.read(length))
        end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
        tensors = {name: Tensor(info["dtype"], tuple(info["shape"]))
                   for name, info in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, struct.error):
        raise LayoutError(f"{path.name} is not a readable safetensors file; re-export it with safetensors") from None
    if 8 + length + end > size:
        raise LayoutError(f"{path.name} is truncated ({size} of {8 + length + end} bytes); copy it again")
    return tensors


def precision(tensors: dict[str, Tensor]) -> str:
    """The precision most of a file's float bytes are in: fp16, bf16 or fp32 (what a worker's dtype must match)."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.dtype in FLOAT_DTYPES:
            n = 1
            for d in t.shape:
                n *= d
            counts[FLOAT_DTYPES[t.dtype]] = counts.get(FLOAT_DTYPES[t.dtype], 0) + n
    return max(counts, key=counts.get) if counts else "none"


# -- single-file checkpoints (original SGM / CompVis / A1111 layout)

def single_file_family(keys: set[str] | dict[str, Any]) -> str | None:
    """The family of an original-layout checkpoint from which text encoders it carries, None if it is not one."""
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return None
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd"
    return None


# -- LoRA adapters

@dataclass(frozen=True)
class LoraInfo:
    format: str  # kohya | diffusers | peft
    parts: frozenset[str]  # unet, te1, te2
    context_width: int | None  # input width of the cross-attention key projection, when the LoRA patches one
    rank: int

    @property
    def family(self) -> str | None:
        """The base architecture a real-size LoRA targets; None when its widths name no known model (tiny ones)."""
        if "te2" in self.parts:
            return "sdxl"
        return CONTEXT_WIDTHS.get(self.context_width or 0)


_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_")
_DOWN = re.compile(r"(lora_down\.weight|lora_A\.weight|lora\.down\.weight|lora_A\.default\.weight)$")


def lora_info(tensors: dict[str, Tensor], peft_folder: bool = False) -> LoraInfo | None:
    """A LoRA's format and targets from its key names, None when the file holds no LoRA keys."""
    keys = list(tensors)
    if not keys:
        return None
    parts: set[str] = set()
    if all(_KOHYA.match(k) for k in keys):
        fmt = "kohya"
        for k in keys:
            part = _KOHYA.match(k)[1]  # type: ignore[index]
            parts.add("te1" if part == "te" else part)
    elif all(".lora" in k or "lora_" in k for k in keys):
        fmt = "peft" if peft_folder or all(k.startswith("base_model.model.") for k in keys) else "diffusers"
        for k in keys:
            head = k.removeprefix("base_model.model.").split(".")[0]
            parts.add({"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}.get(head, "unet"))
    else:
        return None
    width = None
    ranks = [t.shape[0] for k, t in tensors.items() if _DOWN.search(k) and t.shape]
    for k, t in tensors.items():
        flat = k.replace(".", "_")
        if "attn2" in flat and "to_k" in flat and _DOWN.search(k) and len(t.shape) >= 2:
            width = t.shape[1]
            break
    return LoraInfo(fmt, frozenset(parts), width, max(ranks) if ranks else 0)


def base_context_width(base_tensors: dict[str, tuple[int, ...]]) -> int | None:
    """The cross-attention input width of a published base, from its manifest's tensor shapes."""
    for name, shape in base_tensors.items():
        if name.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


# -- diffusers folders

def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise LayoutError(f"{path} is not readable JSON; fix or remove it") from None


def folder_family(root: Path) -> str | None:
    """The family of a diffusers folder from its model_index.json (Würstchen: its prior/ and decoder/ folders)."""
    if (root / "prior" / "model_index.json").is_file() and (root / "decoder" / "model_index.json").is_file():
        return "wuerstchen"
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return None
    name = read_json(index_path).get("_class_name", "")
    if name in ("StableDiffusionXLPipeline",):
        return "sdxl"
    if name in ("StableDiffusionXLImg2ImgPipeline",):
        return "sdxl-refiner" if not (root / "text_encoder").is_dir() else "sdxl"
    if name == "StableDiffusionPipeline":
        unet = root / "unet" / "config.json"
        width = read_json(unet).get("cross_attention_dim") if unet.is_file() else None
        return "sd2" if width == 1024 else "sd"
    raise LayoutError(f"{root.name}: pipeline {name or '?'} is not served by this fleet; "
                      f"families served: {', '.join(FAMILY_NAMES.values())}")
