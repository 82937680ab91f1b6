"""Which device and dtype a worker computes on, decided once and checked at the start, before any sync or load:
"auto" (or nothing) means CUDA with half precision when a GPU is present, the CPU in float32 otherwise."""

from __future__ import annotations

import re

from cachemgr.variants import default_dtype

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:(\d{1,3})|mps)$")
DTYPES = ("float32", "float16", "bfloat16")


class DeviceError(ValueError):
    """A device or dtype this process cannot compute on; the message is one line naming the fix."""


def resolve_device(requested: str | None) -> str:
    """The device to use; a device that is malformed or absent on this node raises DeviceError (one line)."""
    import torch

    if not requested or requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = DEVICE_PATTERN.match(requested.strip())
    if not match:
        raise DeviceError(f"device {requested!r} is not one of cpu, cuda, cuda:N, mps or auto; "
                          "set FLEET_DEVICE / --device to one of them")
    device = match.group(0)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} asked, but torch sees no CUDA device here (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or run on a GPU node")
        count = torch.cuda.device_count()
        if match.group(2) is not None and int(match.group(2)) >= count:
            visible = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
            raise DeviceError(f"device {device} asked, but this process sees {count} CUDA device(s) ({visible}); "
                              "check --device / FLEET_DEVICE and CUDA_VISIBLE_DEVICES")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device mps asked, but torch has no MPS backend here; use --device cpu")
    return device


def resolve_dtype(requested: str | None, device: str) -> str:
    """The dtype to use on `device`; one that device cannot compute in raises DeviceError (one line)."""
    if not requested or requested == "auto":
        return default_dtype(device)
    if requested not in DTYPES:
        raise DeviceError(f"dtype {requested!r} is not one of {', '.join(DTYPES)} or auto; set FLEET_DTYPE")
    if requested == "bfloat16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise DeviceError(f"bfloat16 asked, but {device} does not support it; set FLEET_DTYPE=float16")
    return requested
