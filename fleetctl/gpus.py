"""`warmfleet up --gpus 0,1,…`: one worker process per GPU of the node, each seeing only its own GPU.

Each worker gets CUDA_VISIBLE_DEVICES=<its GPU> and FLEET_DEVICE=cuda:0 (the one device it sees), so no process
ever makes a CUDA context on another worker's GPU. Releases are dealt round-robin over the GPUs; with more releases
than GPUs, a GPU holds several workers."""

from __future__ import annotations

from typing import NamedTuple

from .localfleet import FleetError


class WorkerSlot(NamedTuple):
    name: str
    release: str
    gpu: int | None  # None: no --gpus, the worker picks its device from the settings

    def env(self) -> dict[str, str]:
        """What this worker's environment adds to the fleet's."""
        if self.gpu is None:
            return {}
        return {"CUDA_VISIBLE_DEVICES": str(self.gpu), "FLEET_DEVICE": "cuda:0"}

    def args(self) -> list[str]:
        return [] if self.gpu is None else ["--device", "cuda:0"]


def parse_gpus(text: str | None) -> list[int] | None:
    """"0,1,3" → [0, 1, 3]; refused with one line when malformed or repeated."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise FleetError(f"--gpus {text!r}: give GPU indexes separated by commas, e.g. --gpus 0,1,2,3")
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise FleetError(f"--gpus {text!r} names a GPU twice; one worker per GPU")
    return gpus


def check_gpus(gpus: list[int]) -> None:
    """Refuse, before anything starts, GPUs this node does not have (one line)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise FleetError(f"--gpus {','.join(map(str, gpus))}: torch sees no CUDA device on this node "
                         f"(torch {torch.__version__}); leave out --gpus to run on the CPU")
    missing = [g for g in gpus if g >= count]
    if missing:
        raise FleetError(f"--gpus: GPU {', '.join(map(str, missing))} not on this node; it has {count} "
                         f"(0…{count - 1}) as this process sees them (CUDA_VISIBLE_DEVICES)")


def worker_plan(releases: list[str], gpus: list[int] | None) -> list[WorkerSlot]:
    if not gpus:
        return [WorkerSlot(f"gpu{i}", release, None) for i, release in enumerate(releases)]
    count = max(len(gpus), len(releases))
    per_gpu: dict[int, int] = {}
    slots = []
    for i in range(count):
        gpu = gpus[i % len(gpus)]
        k = per_gpu[gpu] = per_gpu.get(gpu, -1) + 1
        slots.append(WorkerSlot(f"gpu{gpu}" + (f"-{k}" if k else ""), releases[i % len(releases)], gpu))
    return slots
