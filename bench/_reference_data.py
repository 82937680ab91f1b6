"""The reference deployment's files, generated offline and deterministically, streamed to disk tensor by tensor:
an SDXL-sized fp16 single-file base (6.9 GB at scale 1, SGM key prefixes), a second base version with ~12 MB of
tensors changed, and two versions of a kohya-format LoRA (1.2 GB at scale 1). Random weights: these files are for
moving and hashing, not for inference (the tensor shapes follow SDXL's widths but not its exact layer list)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

BASE_BYTES = 6_900_000_000
LORA_BYTES = 1_200_000_000
CHANGED_BYTES = 12_000_000
CHECKPOINT = "sd_xl_base_1.0.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
WIDTHS = (320, 640, 1280)


def _base_tensors(total: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in SGM layout until `total` bytes of fp16: attention and conv weights at SDXL's widths."""
    out: list[tuple[str, tuple[int, ...]]] = []
    size, block = 0, 0
    while size < total:
        width = WIDTHS[min(2, block % 9 // 3)]
        prefix = f"model.diffusion_model.input_blocks.{block}.1.transformer_blocks.0"
        for name, shape in ((f"{prefix}.attn1.to_q.weight", (width, width)),
                            (f"{prefix}.attn1.to_k.weight", (width, width)),
                            (f"{prefix}.attn1.to_v.weight", (width, width)),
                            (f"{prefix}.attn2.to_k.weight", (width, 2048)),
                            (f"{prefix}.ff.net.0.proj.weight", (width * 8, width)),
                            (f"{prefix}.ff.net.2.weight", (width, width * 4)),
                            (f"model.diffusion_model.input_blocks.{block}.0.in_layers.2.weight", (width, width, 3, 3))):
            out.append((name, shape))
            size += 2 * int(np.prod(shape))
            if size >= total:
                break
        block += 1
    return out


def _lora_tensors(total: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = []
    size, i, rank = 0, 0, 128
    while size < total:
        width = WIDTHS[i % 3]
        key = f"lora_unet_input_blocks_{i}_1_transformer_blocks_0_attn1_to_q"
        out += [(f"{key}.lora_down.weight", (rank, width)), (f"{key}.lora_up.weight", (width, rank)),
                (f"{key}.alpha", ())]
        size += 2 * (2 * rank * width) + 2
        i += 1
    return out


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed_of) -> int:
    """fp16 tensors streamed one by one; `seed_of(index)` seeds each tensor's bytes. Returns the file size."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape)) if shape else 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for index, (_, shape) in enumerate(tensors):
            n = int(np.prod(shape)) if shape else 1
            rng = np.random.default_rng(seed_of(index))
            for start in range(0, n, 4 << 20):
                count = min(4 << 20, n - start)
                fh.write((rng.standard_normal(count, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
    tmp.replace(path)
    return 8 + len(raw) + offset


def build(root: Path, scale: float) -> dict[str, Path]:
    """base-v1, base-v2, lora-v1, lora-v2 folders under `root` (kept between runs: a marker names the scale)."""
    marker = root / "built.json"
    folders = {k: root / k for k in ("base-v1", "base-v2", "lora-v1", "lora-v2")}
    if marker.is_file() and json.loads(marker.read_text()).get("scale") == scale:
        return folders
    base = _base_tensors(int(BASE_BYTES * scale))
    sizes = [2 * int(np.prod(s)) for _, s in base]
    changed, total = set(), 0  # a spread of tensors after the first few, ~CHANGED_BYTES in all
    for index in range(len(base) - 1, 0, -7):
        if total + sizes[index] > CHANGED_BYTES * 1.05:
            continue
        changed.add(index)
        total += sizes[index]
    write_safetensors(folders["base-v1"] / CHECKPOINT, base, lambda i: i)
    write_safetensors(folders["base-v2"] / CHECKPOINT, base, lambda i: i + (1 << 20) * (i in changed))
    lora = _lora_tensors(int(LORA_BYTES * scale))
    write_safetensors(folders["lora-v1"] / LORA_FILE, lora, lambda i: 7 << 24 | i)
    write_safetensors(folders["lora-v2"] / LORA_FILE, lora, lambda i: 9 << 24 | i)
    for name in ("lora-v1", "lora-v2"):
        (folders[name] / "adapter_meta.json").write_text('{"format": "kohya", "rank": 128}')
    marker.write_text(json.dumps({"scale": scale, "changed_bytes": total}))
    return folders


def changed_bytes(root: Path) -> int:
    return int(json.loads((root / "built.json").read_text())["changed_bytes"])
