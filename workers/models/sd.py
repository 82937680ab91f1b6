"""Stable Diffusion 1.x / 2.x."""

from .base import ModelBuilder


class StableDiffusion(ModelBuilder):
    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
