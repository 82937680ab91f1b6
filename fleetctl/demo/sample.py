"""Generate a batch of prompts with per-prompt seeds, tile images into a grid a person can look at, and score a
trained version against the judge: `python -m fleetctl.demo.sample [--weights DIR] REF…` prints its pass rates."""

from __future__ import annotations

from typing import Any

from .trained import TRAINED_META


def generate(pipe: Any, prompts: list[str], seed: int = 0, steps: int | None = None, guidance: float | None = None,
             size: int | None = None, rescale: float | None = None) -> list[Any]:
    """One PIL image per prompt; prompt i uses a generator seeded `seed + i`, so a subset repeats its images."""
    import torch

    steps = steps or TRAINED_META["default_steps"]
    guidance = TRAINED_META["default_guidance"] if guidance is None else guidance
    rescale = TRAINED_META["default_guidance_rescale"] if rescale is None else rescale
    size = size or TRAINED_META["default_width"]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=rescale,
               width=size, height=size, generator=generators)
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


def rates(pipe: Any, seed: int = 7, **kwargs: Any) -> dict[str, float]:
    """How often the version draws the asked colour, on the asked side, both; and its mean border brightness."""
    import numpy as np

    from . import shapes

    prompts = [p.text for p in shapes.all_prompts()]
    verdicts = [shapes.judge(im, p) for im, p in zip(generate(pipe, prompts, seed=seed, **kwargs), prompts, strict=True)]
    return {"colour": float(np.mean([v.colour_ok for v in verdicts])), "side": float(np.mean([v.side_ok for v in verdicts])),
            "both": shapes.pass_rate(verdicts), "background": float(np.mean([v.background for v in verdicts])),
            "centre_fill": float(np.mean([v.centre_fill for v in verdicts]))}


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from .trained import BY_REF, WEIGHTS, load_base, lora_pipeline

    parser = argparse.ArgumentParser(prog="python -m fleetctl.demo.sample", description=__doc__.splitlines()[0])
    parser.add_argument("refs", nargs="+", choices=sorted(BY_REF))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--rescale", type=float)
    parser.add_argument("--grid", type=Path, help="also write the 36 images of each version here, as REF.png")
    args = parser.parse_args(argv)
    for ref in args.refs:
        v = BY_REF[ref]
        pipe = load_base(ref, args.weights) if v.component == "base" else lora_pipeline(ref, args.weights)
        pipe.set_progress_bar_config(disable=True)
        kw = {"steps": args.steps, "guidance": args.guidance, "rescale": args.rescale}
        print(ref, {k: round(x, 3) for k, x in rates(pipe, **kw).items()}, flush=True)
        if args.grid:
            from . import shapes

            args.grid.mkdir(parents=True, exist_ok=True)
            images = generate(pipe, [p.text for p in shapes.all_prompts()], seed=7, **kw)
            grid(images, 12).save(args.grid / (ref.replace("/", "-") + ".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
