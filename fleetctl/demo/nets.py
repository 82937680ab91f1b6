"""The trained demo's architectures: the tiny diffusers shapes of fleetctl/demo/builders.py, built empty to be filled.

Training and rebuilding from committed weights both start here, so the two can never disagree on a shape.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from fleetctl.demo.builders import SDXL_SIZES, TINY_UNET, _text_encoder, save_tokenizer

SDXL = SDXL_SIZES["tiny"]
SD_TEXT_WIDTH = 32
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
"""The noise schedule of the demo's schedulers; training noises latents with the same one."""
ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
"""Zero terminal SNR with v-prediction: the noisiest training step is pure noise, as sampling's first step is, so
the model learns to place the shape and set the background from nothing (epsilon-prediction on the plain schedule
leaves ~7 % signal there and never learns to)."""


def tokenizer():
    """The demo's byte-level CLIP BPE tokenizer, as the pipelines save it."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def vocab_size() -> int:
    return len(tokenizer())


VAE_CHANNELS = (16, 32, 32)
LATENT_SIDE = 8
"""Narrower than the random demo's VAE and one level deeper: 32 px images ↔ 4×8×8 latents, so the UNet works on
8×8 and a full training run takes minutes on two CPU cores."""


def vae(scaling_factor: float = 0.18215):
    """The trained demo's tiny AutoencoderKL; the scaling factor puts its latents at unit spread."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=list(VAE_CHANNELS),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(VAE_CHANNELS),
        up_block_types=["UpDecoderBlock2D"] * len(VAE_CHANNELS),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=float(scaling_factor),
    )


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    width_1, width_2 = SDXL["text_widths"]
    return UNet2DConditionModel(
        **{**SDXL["unet"], "sample_size": LATENT_SIDE},
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL["time_embed_dim"],
        projection_class_embeddings_input_dim=SDXL["pooled"] + 6 * SDXL["time_embed_dim"],
        cross_attention_dim=width_1 + width_2,
        norm_num_groups=32,
    )


def sdxl_text_encoders() -> tuple[Any, Any]:
    width_1, width_2 = SDXL["text_widths"]
    n = vocab_size()
    return _text_encoder(n, width_1, None, 0), _text_encoder(n, width_2, SDXL["pooled"], 1)


def sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**TINY_UNET, "sample_size": LATENT_SIDE}, cross_attention_dim=SD_TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)


def sd_text_encoder():
    return _text_encoder(vocab_size(), SD_TEXT_WIDTH, None, 0)


def scheduler(family: str):
    """The sampler a trained version ships with, saved in its pipeline folder so workers sample the same way:
    the training schedule (zero terminal SNR, v-prediction) with trailing spacing, so the first step is pure noise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**BETAS, **ZERO_SNR, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


def noise_schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**BETAS, **ZERO_SNR)


def sdxl_pipeline(unet, text_encoder, text_encoder_2, vae_model):
    from diffusers import StableDiffusionXLPipeline

    tok = tokenizer()
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae_model, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tok, tokenizer_2=tok, scheduler=scheduler("sdxl"),
    )


def sd_pipeline(unet, text_encoder, vae_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet, vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer(), scheduler=scheduler("sd"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
