"""Stable Diffusion 1.x / 2.x: a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler) in L2."""

from .base import ModelBuilder


class StableDiffusion(ModelBuilder):
    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"


class StableDiffusion2(StableDiffusion):
    """Same pipeline class; an OpenCLIP text encoder and 768² images (DEFAULT_SIZES)."""

    family = "sd2"
