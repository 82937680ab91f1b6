"""Generate a batch of prompts with per-prompt seeds, and tile images into a grid a person can look at."""

from __future__ import annotations

from typing import Any

from .trained import TRAINED_META


def generate(pipe: Any, prompts: list[str], seed: int = 0, steps: int | None = None, guidance: float | None = None,
             size: int | None = None) -> list[Any]:
    """One PIL image per prompt; prompt i uses a generator seeded `seed + i`, so a subset repeats its images."""
    import torch

    steps = steps or TRAINED_META["default_steps"]
    guidance = TRAINED_META["default_guidance"] if guidance is None else guidance
    size = size or TRAINED_META["default_width"]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
               generator=generators)
    return list(out.images)


def grid(images: list[Any], cols: int, scale: int = 4) -> Any:
    """Images tiled row by row and enlarged `scale` times (nearest neighbour: pixels stay pixels)."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), (127, 127, 127))
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return sheet.resize((cols * w * scale, rows * h * scale), Image.Resampling.NEAREST)
