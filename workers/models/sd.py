"""Stable Diffusion 1.x / 2.x: a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler) in L2."""

from .base import ModelBuilder


class StableDiffusion(ModelBuilder):
    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
