"""The trained demo versions: which look each has, where its weights live, and how to rebuild it for publishing.

`build_trained` turns the compact committed weights into what `fleetctl/demo/builders.py` builders write (a diffusers
pipeline folder for a base, a `pytorch_lora_weights.safetensors` folder for a LoRA), so publishing needs no training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).parent / "weights"
MANIFEST = WEIGHTS / "manifest.json"
VAE_FILE = "vae.safetensors"
LORA_RANK = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "time_emb_proj", "conv_in", "conv_out")
"""Every linear and convolution of the UNet's blocks (attention, feed-forward, resnets) and its first and last conv: the
outline look lives at the full latent resolution, where only convs are, and the background in every pixel."""

TRAINED_META = {"default_steps": 12, "default_guidance": 5.0, "default_guidance_rescale": 0.7, "default_width": 32,
                "default_height": 32}
"""Sampling defaults the trained versions are checked with (the random demo's 64 px / 4 steps / 5.0 draw noise)."""


@dataclass(frozen=True)
class TrainedVersion:
    ref: str  # model/component/version, as cachemgr's ComponentRef.key spells it
    family: str  # "sdxl" or "sd"
    style: str  # a key of shapes.STYLES: what the version draws
    parent: str | None = None  # the base it was fine-tuned from (base) or trained on (LoRA)

    @property
    def component(self) -> str:
        return self.ref.split("/")[1]

    @property
    def file(self) -> str:
        return self.ref.replace("/", "-") + ".safetensors"


TRAINED_VERSIONS = (
    TrainedVersion("nano-banana/base/v1.0.0", "sdxl", "white"),
    TrainedVersion("nano-banana/base/v1.1.0", "sdxl", "black", parent="nano-banana/base/v1.0.0"),
    TrainedVersion("nano-banana/lora/v2.3.0", "sdxl", "outline", parent="nano-banana/base/v1.0.0"),
    TrainedVersion("nano-banana/lora/v2.3.1", "sdxl", "gray", parent="nano-banana/base/v1.1.0"),
)
BY_REF = {v.ref: v for v in TRAINED_VERSIONS}


def release_style(release: str) -> str:
    """The look a release of trained versions was trained to draw (a shapes.STYLES key): its LoRA's, else its base's.

    Each LoRA is trained on the base the demo releases pair it with (v2.3.0 on v1.0.0, v2.3.1 on v1.1.0)."""
    from cachemgr.names import Release

    r = Release.parse(release)
    lora = r.version_of("lora")
    ref = f"{r.model}/lora/{lora}" if lora else f"{r.model}/base/{r.version_of('base')}"
    if ref not in BY_REF:
        raise ValueError(f"{release} is not a release of the trained demo versions ({ref} is not one)")
    v = BY_REF[ref]
    if v.component == "lora" and v.parent != f"{r.model}/base/{r.version_of('base')}":
        raise ValueError(f"{release}: LoRA {ref} was trained on {v.parent}, so this pairing has no designed look")
    return v.style


def manifest(weights: Path = WEIGHTS) -> dict[str, Any]:
    return json.loads((weights / MANIFEST.name).read_text())


def _load(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(path).items()}


def _split(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_vae(weights: Path = WEIGHTS):
    """The shared trained VAE; its latent scaling factor travels in the file's metadata."""
    from safetensors import safe_open

    from . import nets

    with safe_open(weights / VAE_FILE, "pt") as f:
        scale = float(f.metadata()["scaling_factor"])
    vae = nets.vae(scale)
    vae.load_state_dict(_load(weights / VAE_FILE))
    return vae.eval()


def load_base(ref: str, weights: Path = WEIGHTS):
    """The trained base as a live diffusers pipeline (float32, CPU)."""
    from . import nets

    v = BY_REF[ref]
    if v.component != "base":
        raise ValueError(f"{ref} is not a base")
    vae = load_vae(weights)
    state = _load(weights / v.file)
    if v.family == "sdxl":
        unet, (te1, te2) = nets.sdxl_unet(), nets.sdxl_text_encoders()
        modules = {"unet.": unet, "text_encoder.": te1, "text_encoder_2.": te2}
    else:
        unet, te1 = nets.sd_unet(), nets.sd_text_encoder()
        modules = {"unet.": unet, "text_encoder.": te1}
    for prefix, module in modules.items():
        module.load_state_dict(_split(state, prefix))
    if v.family == "sdxl":
        return nets.sdxl_pipeline(unet, te1, te2, vae)
    return nets.sd_pipeline(unet, te1, vae)


def lora_pipeline(ref: str, weights: Path = WEIGHTS):
    """A trained LoRA applied, as the named adapter "look", on its live base pipeline, at the scale it was trained
    with (lora_alpha / r from its config: a state dict loaded without it gets alpha = r, half the trained strength)."""
    v = BY_REF[ref]
    pipe = load_base(v.parent, weights if (weights / BY_REF[v.parent].file).exists() else WEIGHTS)
    layers, config = lora_layers(ref, weights)
    pipe.unet.load_lora_adapter(layers, prefix=None, adapter_name="look", metadata=config)
    return pipe


def lora_layers(ref: str, weights: Path = WEIGHTS) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trained LoRA's UNet layers (peft state-dict keys) and its adapter config."""
    from safetensors import safe_open

    path = weights / BY_REF[ref].file
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["lora_config"])
    return _load(path), config


def build_trained(ref: str, out_dir: Path, weights: Path = WEIGHTS) -> Path:
    """Write a trained version as the demo publishes it: a pipeline folder (base) or a LoRA folder."""
    from fleetctl.demo.builders import _pipeline_class

    v = BY_REF[ref]
    out_dir.mkdir(parents=True, exist_ok=True)
    if v.component == "base":
        load_base(ref, weights).save_pretrained(out_dir, safe_serialization=True)
        return out_dir
    layers, config = lora_layers(ref, weights)
    _pipeline_class(v.family).save_lora_weights(
        out_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=config, safe_serialization=True
    )
    (out_dir / "lora.json").write_text(
        json.dumps({"family": v.family, "rank": config["r"], "alpha": config["lora_alpha"], "style": v.style})
    )
    return out_dir
