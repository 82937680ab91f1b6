"""Per-release limits and tuning, read from the base version's manifest meta (published with the base):

limits   max_width, max_height, max_steps, max_batch   requests over them are refused with one line (JobRefused)
tuning   vae_tiling_above   decode in tiles when width or height exceeds this many pixels
         channels_last      the UNet (and VAE) in channels-last memory format
         compile_unet       torch.compile the UNet, with one warm-up call before the worker says it is warm

`warmfleet publish … --meta max_width=1024 --meta vae_tiling_above=1536` sets them. Without a limit, the request
model's bounds hold (tasks/requests.py)."""

from __future__ import annotations

from typing import Any

from tasks.errors import JobRefused
from tasks.requests import MAX_SIDE, MAX_STEPS

LIMIT_KEYS = ("max_width", "max_height", "max_steps", "max_batch")


def limits_of(meta: dict[str, Any]) -> dict[str, int]:
    """The limits a base's meta sets, as positive integers; a malformed one is refused at load, never ignored."""
    limits = {}
    for key in LIMIT_KEYS:
        if meta.get(key) is None:
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit() or int(value) < 1:
            raise ValueError(f"manifest meta {key}={value!r} is not a positive whole number; republish the base")
        limits[key] = int(value)
    return limits


def describe_limits(limits: dict[str, int]) -> str:
    width, height = limits.get("max_width", MAX_SIDE), limits.get("max_height", MAX_SIDE)
    return f"at most {width}x{height}, {limits.get('max_steps', MAX_STEPS)} steps"


def check_limits(params: dict[str, Any], limits: dict[str, int], release: str) -> None:
    """Refuse (one line, JobRefused) a job whose resolved parameters exceed its release's limits."""
    over = []
    for name, key in (("width", "max_width"), ("height", "max_height"), ("steps", "max_steps")):
        if key in limits and params[name] > limits[key]:
            over.append(f"{name} {params[name]} > {limits[key]}")
    if over:
        raise JobRefused(f"{params['width']}x{params['height']}, {params['steps']} steps is over the limits of "
                         f"{release} ({'; '.join(over)}): it allows {describe_limits(limits)}")


def tiling_wanted(params: dict[str, Any], meta: dict[str, Any]) -> bool:
    above = meta.get("vae_tiling_above")
    return bool(above) and max(params["width"], params["height"]) > int(above)


def apply_tuning(pipe: Any, meta: dict[str, Any], device: str) -> list[str]:
    """Memory format and compilation the meta asks for; returns what was applied (for the L1_LOAD event)."""
    import torch

    applied = []
    if meta.get("channels_last"):
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if meta.get("compile_unet") and isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        pipe.unet = torch.compile(pipe.unet, mode=str(meta.get("compile_mode", "max-autotune-no-cudagraphs")))
        applied.append("compile_unet")
    return applied
