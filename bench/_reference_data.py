"""The reference deployment's files, generated offline and deterministically, streamed to disk tensor by tensor.

At `--scale 1`: an SDXL base single file (6.94 GB fp16) with the real SGM key layout and shapes — every tensor name
and shape comes from the packaged standard SDXL config (workers/models/configs/sdxl), its modules built on the meta
device and named by the inverse of diffusers' single-file conversion (fleetctl.demo.formats.original_shapes) — so
`warmfleet publish` takes it with no --config and `from_single_file` loads it; a second base version with ~12 MB of
tensors changed; two versions of a kohya LoRA (~1.2 GB) on every attention projection of the UNet and both text
encoders (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`, `.lora_down/.lora_up`, `.alpha`), rank chosen for the size.

At a smaller scale the architecture shrinks (same block and key layout, narrower and shallower UNet and text encoders,
the standard VAE): the files stay loadable, but the shapes are not SDXL's, so that base publishes with the scaled
config folder (`config/`, written beside the files) as `--config`. Random weights (normal, σ 0.02): images are noise.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np

BASE_BYTES = 6_937_675_734  # the SDXL base in fp16, as the standard config builds it
LORA_BYTES = 1_200_000_000
CHANGED_BYTES = 12_000_000
CHECKPOINT = "sd_xl_base_1.0.safetensors"
LORA_FILE = "reference_style_lora.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def architecture(scale: float, into: Path) -> Path | None:
    """The config folder of the base at `scale`: None for the packaged standard SDXL (scale 1), else a narrower copy
    written under `into` (widths × ~√scale, so bytes ∝ scale; the VAE stays standard)."""
    if scale >= 1:
        return None
    from workers.models import standard

    f = math.sqrt(scale)
    c = 32 * max(1, round(10 * f))  # 320 · f, in multiples of 32 (GroupNorm's 32 groups)
    h1 = 64 * max(1, round(12 * f))
    h2 = max(h1 + 64, 64 * round(20 * f))  # never h1: diffusers tells the two encoders apart by their widths
    shutil.rmtree(into, ignore_errors=True)
    standard.write_config("sdxl", into)
    edits = {
        "unet": {"block_out_channels": [c, 2 * c, 4 * c], "attention_head_dim": [c // 32, c // 16, c // 8],
                 "transformer_layers_per_block": [1, max(1, round(2 * f)), max(1, round(10 * f))],
                 "cross_attention_dim": h1 + h2, "projection_class_embeddings_input_dim": 6 * 256 + h2},
        "text_encoder": {"hidden_size": h1, "intermediate_size": 4 * h1, "num_attention_heads": h1 // 64,
                         "num_hidden_layers": max(2, round(12 * f))},
        "text_encoder_2": {"hidden_size": h2, "intermediate_size": 4 * h2, "num_attention_heads": h2 // 64,
                           "num_hidden_layers": max(2, round(32 * f)), "projection_dim": h2},
    }
    for part, change in edits.items():
        path = into / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}, indent=2))
    return into


def base_tensors(config: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the original-layout single file of the pipeline `config` describes."""
    from fleetctl.demo.formats import original_shapes

    return sorted(original_shapes(config).items())


def lora_modules(config: Path) -> list[tuple[str, int, int]]:
    """(kohya stem, in, out) of every attention projection of the UNet and both text encoders (meta device)."""
    import torch

    from workers.models.skeleton import meta_module

    index = json.loads((config / "model_index.json").read_text())
    out = []
    for part, tag, targets in (("unet", "unet", UNET_TARGETS), ("text_encoder", "te1", TEXT_TARGETS),
                               ("text_encoder_2", "te2", TEXT_TARGETS)):
        module = meta_module(config / part, *index[part])
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(targets) and ("attn" in name):
                if tag != "unet" and not name.startswith("text_model."):  # kohya names the CLIP text_model too
                    name = "text_model." + name
                out.append((f"lora_{tag}_" + name.replace(".", "_"), layer.in_features, layer.out_features))
    return out


def lora_tensors(modules: list[tuple[str, int, int]], total: int) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """(rank, tensors): the rank (a multiple of 4) that brings the adapter's fp16 bytes nearest `total`."""
    per_rank = 2 * sum(i + o for _, i, o in modules)
    rank = max(4, 4 * round(total / per_rank / 4))
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for stem, fan_in, fan_out in modules:
        tensors += [(f"{stem}.alpha", ()), (f"{stem}.lora_down.weight", (rank, fan_in)),
                    (f"{stem}.lora_up.weight", (fan_out, rank))]
    return rank, tensors


def _spans(tensors: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, list[tuple[int, int]]]:
    header, spans, offset = {}, [], 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        spans.append((offset, n))
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans


POOL_VALUES = 1 << 24  # 32 MB of N(0, 0.02²) fp16 values, drawn once


def _pool() -> np.ndarray:
    global _POOL
    if _POOL is None:
        rng = np.random.default_rng(20240229)
        _POOL = (rng.standard_normal(2 * POOL_VALUES, dtype=np.float32) * 0.02).astype(np.float16)
    return _POOL


_POOL: np.ndarray | None = None


def _values(shape: tuple[int, ...], name: str, seed: int):
    """A tensor's fp16 bytes in ≤16M-value pieces, windows of the pool at offsets drawn from `seed` (random draws
    per value would make an 8 GB build CPU-bound for many minutes); or the LoRA's alpha (= its rank)."""
    if name.endswith(".alpha"):
        yield np.float16(seed).tobytes()
        return
    n, pool = math.prod(shape), _pool()
    rng = np.random.default_rng(seed)
    for start in range(0, n, POOL_VALUES):
        offset = int(rng.integers(0, POOL_VALUES))
        yield pool[offset:offset + min(POOL_VALUES, n - start)].tobytes()


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed_of) -> int:
    """fp16 tensors streamed one by one; `seed_of(index)` seeds each tensor's bytes. Returns the file size."""
    head, _ = _spans(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        fh.write(head)
        for index, (name, shape) in enumerate(tensors):
            for piece in _values(shape, name, seed_of(index)):
                fh.write(piece)
    tmp.replace(path)
    return tmp.stat().st_size if tmp.exists() else path.stat().st_size


def rewrite_tensors(src: Path, dest: Path, tensors: list[tuple[str, tuple[int, ...]]], changed: set[int],
                    seed_of) -> None:
    """`dest` = `src` with the tensors at `changed` rewritten from new seeds (a copy, then in-place writes)."""
    head, spans = _spans(tensors)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(src, tmp)
    with open(tmp, "r+b") as fh:
        for index in sorted(changed):
            fh.seek(len(head) + spans[index][0])
            for piece in _values(tensors[index][1], tensors[index][0], seed_of(index)):
                fh.write(piece)
    tmp.replace(dest)


def build(root: Path, scale: float) -> dict[str, Path]:
    """base-v1, base-v2, lora-v1, lora-v2 folders (and config/ below scale 1) under `root`, kept between runs: a
    marker names the scale."""
    marker = root / "built.json"
    folders = {k: root / k for k in ("base-v1", "base-v2", "lora-v1", "lora-v2")}
    if marker.is_file() and json.loads(marker.read_text()).get("scale") == scale:
        return folders
    shutil.rmtree(root, ignore_errors=True)
    from workers.models import standard

    config = architecture(scale, root / "config") or standard.CONFIGS / "sdxl"
    base = base_tensors(config)
    sizes = [2 * math.prod(s) for _, s in base]
    changed, total = set(), 0  # a spread of tensors after the first few, ~CHANGED_BYTES in all (at most 1/20)
    for index in range(len(base) - 1, 0, -7):
        if total + sizes[index] > min(CHANGED_BYTES, sum(sizes) / 20) * 1.05:
            continue
        changed.add(index)
        total += sizes[index]
    write_safetensors(folders["base-v1"] / CHECKPOINT, base, lambda i: i)
    rewrite_tensors(folders["base-v1"] / CHECKPOINT, folders["base-v2"] / CHECKPOINT, base, changed,
                    lambda i: i + (1 << 20))
    rank, lora = lora_tensors(lora_modules(config), int(LORA_BYTES * scale))
    for name, seed in (("lora-v1", 7 << 24), ("lora-v2", 9 << 24)):
        write_safetensors(folders[name] / LORA_FILE, lora,
                          lambda i, s=seed: rank if lora[i][0].endswith(".alpha") else s | i)
    marker.write_text(json.dumps({"scale": scale, "changed_bytes": total, "lora_rank": rank,
                                  "standard": scale >= 1, "tensors": len(base)}))
    return folders


def config_dir(root: Path) -> Path | None:
    """The --config a base built under `root` publishes with (None: the packaged standard one)."""
    return None if json.loads((root / "built.json").read_text())["standard"] else root / "config"


def changed_bytes(root: Path) -> int:
    return int(json.loads((root / "built.json").read_text())["changed_bytes"])


def lora_rank(root: Path) -> int:
    return int(json.loads((root / "built.json").read_text())["lora_rank"])
