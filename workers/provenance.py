"""Provenance in every image: PNG text chunks saying what made it, so an image found on disk explains itself.

Two conventions at once: AUTOMATIC1111's `parameters` chunk (what image viewers and web UIs read) and the fleet's own
`warmfleet:*` keys (one value each). Chunks are inserted after IHDR without touching the image data, so the pixels and
the image chunks stay byte-identical; UTF-8 text goes in iTXt chunks."""

from __future__ import annotations

import struct
import zlib
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEY_PREFIX = "warmfleet:"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language tag, no translated keyword, UTF-8 text
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def a1111_parameters(prompt: str, params: dict[str, Any], release: str) -> str:
    """The A1111 `parameters` text: the prompt, a `Negative prompt:` line, then `Key: value, …`."""
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = [("Steps", params.get("steps")), ("Sampler", params.get("scheduler")),
              ("CFG scale", params.get("guidance")), ("Seed", params.get("seed")),
              ("Size", f"{params.get('width')}x{params.get('height')}"), ("Model", release),
              ("Version", "warmfleet")]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def provenance(prompt: str, params: dict[str, Any], release: str) -> dict[str, str]:
    """The text chunks of one image: `parameters` and `warmfleet:<key>` for release, seed, steps, guidance, size, prompt."""
    own = {"release": release, "prompt": prompt, "seed": params.get("seed"), "steps": params.get("steps"),
           "guidance": params.get("guidance"), "width": params.get("width"), "height": params.get("height"),
           "negative_prompt": params.get("negative_prompt")}
    chunks = {"parameters": a1111_parameters(prompt, params, release)}
    chunks.update({KEY_PREFIX + k: str(v) for k, v in own.items() if v is not None and v != ""})
    return chunks


def with_text(png: bytes, chunks: dict[str, str]) -> bytes:
    """`png` with `chunks` as text chunks right after IHDR (the image chunks untouched)."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG with IHDR first")
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:ihdr_end] + b"".join(_text_chunk(k, v) for k, v in chunks.items()) + png[ihdr_end:]
