"""L1: a pipeline loaded once into device memory and only read afterwards."""

from __future__ import annotations

import io
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from tasks.requests import GenerateRequest


@dataclass
class ResidentPipeline:
    release: str
    family: str
    pipeline: Any
    device: str
    dtype: str
    defaults: dict[str, Any]
    load_seconds: float = 0.0
    nbytes: int = 0
    calls: int = field(default=0)

    def resolve(self, request: GenerateRequest) -> dict[str, Any]:
        return {
            "steps": request.steps or self.defaults["steps"],
            "guidance": request.guidance if request.guidance is not None else self.defaults["guidance"],
            "width": request.width or self.defaults["width"],
            "height": request.height or self.defaults["height"],
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**32),
        }

    def generate(self, request: GenerateRequest) -> tuple[bytes, dict[str, Any], float]:
        """PNG bytes, the parameters used, and inference seconds. Same seed → same bytes."""
        import torch

        params = self.resolve(request)
        generator = torch.Generator("cpu").manual_seed(params["seed"])
        started = time.perf_counter()
        with torch.inference_mode():
            result = self.pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance"],
                width=params["width"],
                height=params["height"],
                generator=generator,
            )
        inference = time.perf_counter() - started
        self.calls += 1
        buf = io.BytesIO()
        result.images[0].save(buf, format="PNG")
        return buf.getvalue(), params, inference
