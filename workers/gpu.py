"""What a worker knows about its device: memory in use, out-of-memory errors, and the bytes its pipeline holds.

On the CPU every figure is 0: there is no device allocator to ask. The plumbing (registry, status, /metrics) is the
same on both, so an operator reads one set of fields whatever the node."""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes of one device, as the process's caching allocator sees them (peak since the process started)."""

    allocated: int = 0
    reserved: int = 0
    total: int = 0
    peak: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def device_memory(device: str) -> DeviceMemory:
    """The device's memory figures; zeros on the CPU (and where CUDA cannot answer)."""
    if not device.startswith("cuda"):
        return DeviceMemory()
    import torch

    try:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return DeviceMemory(
            allocated=int(torch.cuda.memory_allocated(index)),
            reserved=int(torch.cuda.memory_reserved(index)),
            total=int(torch.cuda.get_device_properties(index).total_memory),
            peak=int(torch.cuda.max_memory_reserved(index)),
        )
    except Exception:  # a broken CUDA context must not break the report of it
        return DeviceMemory()


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failed (torch.cuda.OutOfMemoryError, or a backend's plain "out of memory" error)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_device_memory(device: str) -> None:
    """Give the memory a failed job held back: collect its tensors, then empty the CUDA allocator's cache."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        try:
            with torch.cuda.device(torch.device(device)):
                torch.cuda.empty_cache()
        except Exception:  # a sick context: the breaker will say so; freeing must never raise over the job's error
            pass


def resident_bytes(pipeline: Any) -> int:
    """Bytes actually held by the pipeline's modules: every parameter and buffer, each counted once."""
    import torch

    components = getattr(pipeline, "components", None) or {}
    seen: set[int] = set()
    total = 0
    for module in (m for m in components.values() if isinstance(m, torch.nn.Module)):
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.nbytes
    return total


def sample_into(state: Any, device: str) -> None:
    """Copy the device's memory figures into a WorkerState (before it is published)."""
    memory = device_memory(device)
    state.mem_allocated, state.mem_reserved = memory.allocated, memory.reserved
    state.mem_total, state.mem_peak = memory.total, memory.peak
