"""Which device and dtype a worker computes on, decided once: "auto" (or nothing) means CUDA with half
precision when a GPU is present, the CPU in float32 otherwise."""

from __future__ import annotations


def resolve_device(requested: str | None) -> str:
    if requested and requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: str | None, device: str) -> str:
    if requested and requested != "auto":
        return requested
    return "float16" if device.startswith("cuda") else "float32"
