"""Precision variants of a published version (diffusers' `x.fp16.safetensors` naming) and the sync filter that
fetches only the files of the precision a node computes in: worker boot and the nightly sync use the same one."""

from __future__ import annotations

import re
from typing import Any

_VARIANT = re.compile(r"\.(fp16|bf16|fp32)(?:-\d+-of-\d+)?\.safetensors$|\.safetensors\.index\.(fp16|bf16|fp32)\.json$")


def default_dtype(device: str) -> str:
    """The precision a device computes in unless told otherwise: half on CUDA, float32 elsewhere. Worker boot and
    the nightly sync both resolve it here, so a node never fetches the files of a precision it does not use."""
    return "float16" if device.startswith("cuda") else "float32"


def variant_of(rel: str) -> str | None:
    """diffusers' variant naming: `x.fp16.safetensors`, `x.fp16-00001-of-00002.safetensors`, `x.safetensors.index.fp16.json`."""
    m = _VARIANT.search(rel)
    return (m[1] or m[2]) if m else None


def is_weights(rel: str) -> bool:
    return rel.endswith(".safetensors") or (".safetensors.index" in rel and rel.endswith(".json"))


def wanted_files(meta: dict[str, Any], paths: list[str], dtype: str) -> set[str] | None:
    """The files a worker on `dtype` needs from a diffusers version with variants; None means all of them.
    fp16 workers take the fp16 files, others the plain (fp32) ones when there are any."""
    variant = variant_for(meta, dtype)
    if not meta.get("variants"):
        return None
    return {p for p in paths if not is_weights(p) or variant_of(p) == variant}


def variant_for(meta: dict[str, Any], dtype: str) -> str | None:
    """The `variant=` a worker passes to from_pretrained: its dtype's when published, else the plain files, else
    the only variant there is (fp16-only folders load on fp32 workers too, cast up)."""
    variants = list(meta.get("variants") or ())
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
    if short in variants:
        return short
    if meta.get("plain_weights", True) or not variants:
        return None
    return variants[0]


def files_for(dtype: str):  # noqa: ANN201 - a cachemgr.sync.Select
    """The sync filter of a worker computing in `dtype`."""
    def select(manifest: Any) -> set[str] | None:
        return wanted_files(manifest.meta, manifest.version_paths, dtype)

    return select
