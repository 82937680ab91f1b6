"""Stable Diffusion XL: two text encoders, size and crop conditioning; a diffusers folder in L2."""

from typing import Any

from .base import ModelBuilder


class StableDiffusionXL(ModelBuilder):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def defaults(self, meta: dict[str, Any]) -> dict[str, Any]:
        d = super().defaults(meta)
        d["width"] = int(meta.get("default_width", 1024))
        d["height"] = int(meta.get("default_height", 1024))
        return d
