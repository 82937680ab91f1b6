"""A real `warmfleet worker` process whose device misbehaves, injected by wrapping the real thing in this test entry
module (never by a hook in production code). The pipeline object each builder loads is wrapped at its call:

$WARMFLEET_TEST_OOM_ABOVE=N        calls wider or taller than N pixels raise torch.cuda.OutOfMemoryError
$WARMFLEET_TEST_OOM_ONCE=PROMPT    the first call with this prompt raises torch.cuda.OutOfMemoryError, later ones run
$WARMFLEET_TEST_DEVICE_LOST=PATH   while PATH exists every call raises CUDA's sticky "illegal memory access" error
$WARMFLEET_TEST_MEMORY=a,r,t       the device reports a bytes allocated, r reserved, t total (CPU reports zeros)

Freeing device memory is logged ("test: freed device memory on …") so a test can see it happened.
Run as `python -m tests.device_fault_worker worker --release R …` (the arguments of `warmfleet worker`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
               "1.20 GiB is free.\nOf the allocated memory 70.1 GiB is allocated by PyTorch, and 3.2 GiB is reserved "
               "by PyTorch but unallocated.\nIf reserved but unallocated memory is large try setting "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
LOST_MESSAGE = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
                "reported at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
                "passing CUDA_LAUNCH_BLOCKING=1")


class FaultyDevicePipeline:
    """The loaded diffusers pipeline, with the device faults above at its call; everything else is the real one."""

    def __init__(self, pipeline: Any) -> None:
        self.__dict__["_real"] = pipeline
        self.__dict__["_seen"] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)

    def __call__(self, **kwargs: Any) -> Any:
        import torch

        lost = os.environ.get("WARMFLEET_TEST_DEVICE_LOST")
        if lost and Path(lost).exists():
            raise RuntimeError(LOST_MESSAGE)
        above = int(os.environ.get("WARMFLEET_TEST_OOM_ABOVE") or 0)
        if above and max(kwargs.get("width") or 0, kwargs.get("height") or 0) > above:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        once = os.environ.get("WARMFLEET_TEST_OOM_ONCE")
        if once and kwargs.get("prompt") == once and once not in self._seen:
            self._seen.add(once)
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return self._real(**kwargs)


def install() -> None:
    import workers.gpu
    import workers.jobs
    from workers.models.base import ModelBuilder

    build = ModelBuilder.build

    def build_on_faulty_device(self):  # noqa: ANN001, ANN202 - ModelBuilder.build's signature
        resident = build(self)
        resident.pipeline = FaultyDevicePipeline(resident.pipeline)
        return resident

    ModelBuilder.build = build_on_faulty_device

    release = workers.jobs.release_device_memory

    def release_and_say(device: str) -> None:
        release(device)
        print(f"test: freed device memory on {device}", flush=True)

    workers.jobs.release_device_memory = release_and_say

    figures = os.environ.get("WARMFLEET_TEST_MEMORY")
    if figures:
        allocated, reserved, total = (int(x) for x in figures.split(","))
        memory = workers.gpu.DeviceMemory(allocated, reserved, total, peak=reserved)
        workers.gpu.device_memory = lambda device: memory


if __name__ == "__main__":
    install()
    from fleetctl.cli import main

    main()
