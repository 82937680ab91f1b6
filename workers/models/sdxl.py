"""Stable Diffusion XL: two text encoders, size and crop conditioning; a diffusers folder in L2 (1024² by default,
see DEFAULT_SIZES)."""

from .base import ModelBuilder


class StableDiffusionXL(ModelBuilder):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
