"""L1: a pipeline loaded once into device memory and only read afterwards.

One resident pipeline may serve several releases that share its base and differ only in their LoRA: each
LoRA is loaded once as a named adapter, and a job activates its release's adapters (`set_adapters`, a few
milliseconds) instead of reloading anything. Adapters are never fused: fusing drifts the base weights, and
a switched adapter must give the same bytes as a pipeline that holds that adapter alone.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.requests import GenerateRequest

from .limits import check_limits, tiling_wanted

CallKwargs = Callable[[GenerateRequest, dict[str, Any], dict[str, Any]], dict[str, Any]]
"""(request, resolved params, release defaults) → keyword arguments of the family's pipeline call."""


def standard_call_kwargs(request: GenerateRequest, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The Stable Diffusion call shape (SD 1.x/2.x, SDXL, single-file checkpoints); a release whose meta sets
    `default_guidance_rescale` (zero-terminal-SNR models) gets it passed as `guidance_rescale`."""
    kwargs = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "num_inference_steps": params["steps"],
        "guidance_scale": params["guidance"],
        "width": params["width"],
        "height": params["height"],
    }
    if defaults.get("guidance_rescale"):
        kwargs["guidance_rescale"] = defaults["guidance_rescale"]
    return kwargs


class NotResident(KeyError):
    """A release this pipeline does not hold: routing sent a job to the wrong worker."""


@dataclass
class ResidentPipeline:
    release: str  # the release it was built for first; a shared pipeline serves every key of `adapters`
    family: str
    pipeline: Any
    device: str
    dtype: str
    defaults: dict[str, Any]
    load_seconds: float = 0.0
    nbytes: int = 0
    calls: int = field(default=0)
    adapters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # release → its adapter names
    call_kwargs: CallKwargs = standard_call_kwargs
    active: str | None = None
    switches: int = 0
    lora_disabled: bool = False
    last_used: dict[str, float] = field(default_factory=dict)  # release → time.monotonic() of its last job

    limits: dict[str, int] = field(default_factory=dict)  # max_width, max_height, max_steps, max_batch (workers/limits)
    tuning: dict[str, Any] = field(default_factory=dict)  # the base's meta: vae_tiling_above, …
    tiled: bool = False

    @property
    def releases(self) -> list[str]:
        return list(self.adapters) or [self.release]

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter held in device memory, once each, in load order."""
        return list(dict.fromkeys(name for names in self.adapters.values() for name in names))

    def activate(self, release: str) -> float:
        """Make `release`'s adapters the active ones; returns the seconds it took (0 when already active)."""
        self.last_used[release] = time.monotonic()
        if release == self.active:
            return 0.0
        if release not in self.releases:
            raise NotResident(f"{release} is not resident here; this pipeline serves {', '.join(self.releases)}")
        started = time.perf_counter()
        names = self.adapters.get(release, ())
        if names:
            if self.lora_disabled:  # enable_lora walks every module: as costly as the switch itself
                self.pipeline.enable_lora()
                self.lora_disabled = False
            self.pipeline.set_adapters(list(names))  # diffusers' own: every adapter at weight 1.0
        elif self.adapter_names:
            self.pipeline.disable_lora()  # a base-only release beside LoRA releases: run the bare base
            self.lora_disabled = True
        self.active = release
        self.switches += 1
        return time.perf_counter() - started

    def add_adapter(self, release: str, name: str, load: Callable[[Any], None]) -> None:
        """Serve one more release on this pipeline: `load(pipeline)` loads its LoRA as adapter `name`.

        Loading makes the new adapter peft's active one, so the next job re-activates its own release. A load that
        fails leaves nothing behind: the partial adapter is deleted and the releases served before are unchanged."""
        held = name in self.adapter_names
        try:
            if not held:
                load(self.pipeline)
        except BaseException:
            if name in _peft_adapters(self.pipeline):
                self.pipeline.delete_adapters([name])
            raise
        finally:
            self.active = None
        self.adapters[release] = (name,)
        self.last_used[release] = time.monotonic()

    def remove_release(self, release: str) -> list[str]:
        """Stop serving `release`: its adapters no other release uses are deleted (their memory freed)."""
        names = self.adapters.pop(release, ())
        self.last_used.pop(release, None)
        still_used = set(self.adapter_names)
        gone = [name for name in names if name not in still_used]
        if gone:
            self.pipeline.delete_adapters(gone)
        if self.active == release or gone:
            self.active = None
        return gone

    def lora_footprint(self) -> tuple[int, int]:
        """(parameters, bytes) of every LoRA layer resident in the pipeline's modules: what adapters cost."""
        params = nbytes = 0
        for module in _modules(self.pipeline):
            for name, p in module.named_parameters():
                if "lora_" in name:
                    params += p.numel()
                    nbytes += p.numel() * p.element_size()
        return params, nbytes

    def resolve(self, request: GenerateRequest) -> dict[str, Any]:
        """The job's parameters with the release's defaults; over the release's limits, JobRefused (one line)."""
        params = {
            "steps": request.steps or self.defaults["steps"],
            "guidance": request.guidance if request.guidance is not None else self.defaults["guidance"],
            "width": request.width or self.defaults["width"],
            "height": request.height or self.defaults["height"],
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**32),
        }
        check_limits(params, self.limits, request.release or self.active or self.release)
        return params

    def tile_for(self, params: dict[str, Any]) -> None:
        """Decode in tiles above the release's `vae_tiling_above` side, whole below it (switched only on change)."""
        want = tiling_wanted(params, self.tuning)
        vae = getattr(self.pipeline, "vae", None)
        if want != self.tiled and hasattr(vae, "enable_tiling"):
            (vae.enable_tiling if want else vae.disable_tiling)()
            self.tiled = want

    def generate(self, request: GenerateRequest, release: str | None = None) -> tuple[bytes, dict[str, Any], float]:
        """PNG bytes, the parameters used, and inference seconds. Same release and seed → same bytes."""
        import torch

        self.activate(release or self.active or self.release)
        params = self.resolve(request)
        self.tile_for(params)
        generator = torch.Generator("cpu").manual_seed(params["seed"])
        started = time.perf_counter()
        with torch.inference_mode():
            result = self.pipeline(**self.call_kwargs(request, params, self.defaults), generator=generator)
        inference = time.perf_counter() - started
        self.calls += 1
        buf = io.BytesIO()
        result.images[0].save(buf, format="PNG")
        return buf.getvalue(), params, inference

    def generate_batch(self, requests: list[GenerateRequest], release: str) -> tuple[list[tuple[bytes, dict[str, Any]]], float]:
        """One pipeline call for jobs of the same call shape (workers/batching.py decides which): prompts as a list
        and one seeded generator per job, so each image is its own job's. Returns (PNG, params) per job, in order,
        and the seconds of the one call."""
        import torch

        self.activate(release)
        params = [self.resolve(request) for request in requests]
        self.tile_for(params[0])  # one call shape: the same size for every job
        calls = [self.call_kwargs(request, p, self.defaults) for request, p in zip(requests, params, strict=True)]
        kwargs = dict(calls[0])
        kwargs["prompt"] = [call["prompt"] for call in calls]
        negatives = [call.get("negative_prompt") for call in calls]
        kwargs["negative_prompt"] = None if all(n is None for n in negatives) else negatives
        generators = [torch.Generator("cpu").manual_seed(p["seed"]) for p in params]
        started = time.perf_counter()
        with torch.inference_mode():
            result = self.pipeline(**kwargs, generator=generators)
        inference = time.perf_counter() - started
        if len(result.images) != len(requests):
            raise RuntimeError(f"a batch of {len(requests)} jobs gave {len(result.images)} images")
        self.calls += 1
        encoded = []
        for image, p in zip(result.images, params, strict=True):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded.append((buf.getvalue(), p))
        return encoded, inference


def _modules(pipeline: Any) -> list[Any]:
    """The pipeline's torch modules (UNet or transformer, text encoders, VAE…)."""
    import torch

    return [m for m in getattr(pipeline, "components", {}).values() if isinstance(m, torch.nn.Module)]


def _peft_adapters(pipeline: Any) -> set[str]:
    try:
        return {name for names in pipeline.get_list_adapters().values() for name in names}
    except Exception:  # a pipeline without LoRA support holds none
        return set()
