"""A contact sheet of a demo run: one PNG with a row per job (the image, its prompt and the release that drew it)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

THUMB = 96
"""Every image is shown at this side (nearest neighbour: the 32 px demo images stay crisp)."""


def read_image(result: dict[str, Any], output_url: str) -> bytes:
    """A job's PNG: through its file:// URI, or from the output store it was written to."""
    from workers.outputs import open_output_store, read_uri

    if result["image_uri"].startswith("file:"):
        return read_uri(result["image_uri"])
    return open_output_store(output_url).get(result["image_key"])


def contact_sheet(rows: list[tuple[str, str, bytes]], path: Path, thumb: int = THUMB) -> Path:
    """Write `rows` of (prompt, release, PNG bytes) as one sheet at `path`; returns the path."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("a contact sheet needs at least one image")
    pad, text_w = 8, 360
    sheet = Image.new("RGB", (pad * 3 + thumb + text_w, pad + len(rows) * (thumb + pad)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for i, (prompt, release, png) in enumerate(rows):
        y = pad + i * (thumb + pad)
        image = Image.open(io.BytesIO(png)).convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST)
        sheet.paste(image, (pad, y))
        pen.rectangle((pad - 1, y - 1, pad + thumb, y + thumb), outline=(160, 160, 160))
        pen.text((pad * 2 + thumb, y + thumb // 2 - 14), prompt, fill=(0, 0, 0))
        pen.text((pad * 2 + thumb, y + thumb // 2 + 2), release, fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
