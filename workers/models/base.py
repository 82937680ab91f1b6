"""One builder shape for every model family: `Family.builder(model, release=…).with_cache(…).build()`.

A family module says only what differs: how its base version is laid out and loaded (`load_pipeline`), its
defaults, and how its pipeline is called (`call_kwargs`). Everything else — where L2 is, filling it from L3,
device and dtype, LoRA adapters, several releases on one base — is here, once.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar, Self

from cachemgr import Archive, Cache, EventLog, Release, SnapshotStore
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_release
from fleetstate.live import base_key
from tasks.requests import GenerateRequest

from ..device import resolve_device, resolve_dtype
from ..gpu import resident_bytes
from ..limits import apply_tuning, limits_of
from ..resident import ResidentPipeline, standard_call_kwargs
from .layouts import PEFT_CONFIG, files_for, variant_for
from .vae import VAE_FAMILIES, load_vae

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_SIZES = {"sd": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024, "wuerstchen": 1024}
"""Image side a family was trained at, whatever the layout it is published in; a version's meta may override it."""


def adapter_name(version: str) -> str:
    """peft module names may not contain '.', so v2.3.1 becomes lora_v2_3_1."""
    return "lora_" + version.replace(".", "_").replace("-", "_")


def shared_base_key(release: Release) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Releases with the same key differ only in their LoRA, so one loaded pipeline can serve them all."""
    return base_key(release)  # declared in fleetstate: the fleet's auto-warm picks workers by the same key


def group_by_base(releases: list[Release]) -> list[list[Release]]:
    """Releases grouped so each group needs one pipeline load; the order of first appearance is kept."""
    groups: dict[tuple, list[Release]] = {}
    for release in releases:
        group = groups.setdefault(shared_base_key(release), [])
        if release not in group:
            group.append(release)
    return list(groups.values())


def load_adapter(pipe: Any, store: SnapshotStore, ref: ComponentRef) -> str:
    """One LoRA version from L2 as a named adapter of a loaded pipeline (at boot, or live between two jobs)."""
    name = adapter_name(ref.version)
    with warnings.catch_warnings():  # peft warns on a second adapter: here that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        load_lora(pipe, store.path(ref), store.manifest(ref).meta, name)
    return name


class LoadError(RuntimeError):
    """A release that cannot be loaded (missing or corrupt files, wrong family); the worker stays cold."""


def load_lora(pipe: Any, path: Any, meta: dict[str, Any], name: str) -> None:
    """One LoRA version as a named adapter, whatever its file is called and whichever format it is in: kohya/A1111
    and diffusers files through the pipeline's `load_lora_weights`; a PEFT folder (keys named after the UNet's own
    modules, its LoraConfig beside them) through the UNet's `load_lora_adapter`. diffusers' public API both."""
    weight_name = str(meta.get("weight_name") or LORA_WEIGHT_NAME)
    if meta.get("lora_format") != "peft":
        pipe.load_lora_weights(str(path), weight_name=weight_name, adapter_name=name, local_files_only=True,
                               low_cpu_mem_usage=True)
        return
    import json

    from safetensors.torch import load_file

    config = json.loads((path / PEFT_CONFIG).read_text())
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(path / weight_name)).items()}
    pipe.unet.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=config, low_cpu_mem_usage=True)


def load_folder(cls: Any, folder: Any, torch_dtype: Any, variant: str | None) -> Any:
    """`Pipeline.from_pretrained` of a diffusers folder in L2: offline, safetensors only, weights straight into the
    modules (`low_cpu_mem_usage`), in the worker's dtype, from the variant files its dtype asks for.
    (`dtype=` is diffusers' current name of `torch_dtype=`, which it deprecates.)"""
    return cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=True, use_safetensors=True,
                               dtype=torch_dtype, variant=variant)


class ModelBuilder:
    family: ClassVar[str] = ""
    pipeline_class_name: ClassVar[str] = ""
    supports_lora: ClassVar[bool] = True

    def __init__(self, model: str, release: str | Release | None = None) -> None:
        self.model = model
        self.release = Release.parse(str(release)) if release else None
        self.shared: list[Release] = []
        self.cache: Cache | None = None
        self.archive: Archive | None = None
        self.device: str | None = None
        self.dtype: str | None = None
        self.events: EventLog | None = None
        self.variant: str | None = None
        if self.release:
            self._check_model(self.release)

    @classmethod
    def builder(cls, model: str, release: str | Release | None = None) -> Self:
        return cls(model, release)

    def with_cache(self, cache: Cache) -> Self:
        """Where L2 lives for this model. Omitted: the settings' cache root (FLEET_CACHE_ROOT overrides it)."""
        self.cache = cache
        return self

    def with_release(self, release: str | Release) -> Self:
        self.release = self._check_model(Release.parse(str(release)))
        return self

    def also_serving(self, *releases: str | Release) -> Self:
        """More releases on the same base: their LoRAs load as extra adapters of the one pipeline."""
        for release in releases:
            self.shared.append(self._check_model(Release.parse(str(release))))
        return self

    def with_archive(self, archive: Archive) -> Self:
        """Fill L2 from this archive when the release is missing there."""
        self.archive = archive
        return self

    def on(self, device: str, dtype: str | None = None) -> Self:
        self.device = device
        self.dtype = dtype
        return self

    def with_events(self, events: EventLog) -> Self:
        self.events = events
        return self

    # -- resolution
    def _check_model(self, release: Release) -> Release:
        if release.model != self.model:
            raise ValueError(f"release {release} is not a release of model {self.model!r}")
        return release

    @property
    def releases(self) -> list[Release]:
        if self.release is None:
            raise LoadError(f"no release given for {self.model}: use .with_release('{self.model}@base-…')")
        return list(dict.fromkeys([self.release, *self.shared]))

    def _resolved_cache(self) -> Cache:
        if self.cache is not None:
            return self.cache
        from tasks.settings import load_settings

        return Cache.at(load_settings().resolved_cache_root)

    def _resolved_device(self) -> tuple[str, str]:
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)

    def ensure_local(self) -> SnapshotStore:
        """L2 first: sync from the archive if given, else insist every component is already on disk."""
        releases = self.releases
        store = self._resolved_cache().store
        select = files_for(self._resolved_device()[1])
        for release in releases:
            missing = [ref for ref in release.refs() if not store.has(ref, select)]
            if missing and self.archive is not None:
                sync_release(self.archive, store, release, events=self.events, select=select)
            elif missing:
                raise LoadError(
                    f"{', '.join(map(str, missing))} not in L2 at {store.root}; run `warmfleet sync` or give an archive"
                )
        return store

    def check_releases(self) -> list[Release]:
        """Refuse, before touching any disk, what this builder could only get wrong: releases on different
        bases, components it does not know, and LoRAs on a family that takes none."""
        first, *rest = releases = self.releases
        for release in rest:
            if shared_base_key(release) != shared_base_key(first):
                raise LoadError(
                    f"{release} and {first} do not share a base (only their LoRA may differ); "
                    "serve them from separate workers"
                )
        for release in releases:
            for component, _ in release.components[1:]:
                if component == "vae":
                    if self.family not in VAE_FAMILIES:
                        raise LoadError(f"{release}: the {self.family} builder takes no published VAE")
                    continue
                if component != "lora":
                    raise LoadError(f"{release}: component {component!r} is not supported by the {self.family} builder")
                if not self.supports_lora:
                    raise LoadError(f"{release}: the {self.family} builder does not load LoRA adapters")
        return releases

    def build(self) -> ResidentPipeline:
        import torch

        releases = self.check_releases()
        store = self.ensure_local()
        primary = releases[0]
        base = store.manifest(primary.base)
        family = base.meta.get("family")
        if family and not self.accepts(base.meta):
            raise LoadError(f"{primary.base} is a {family!r} model, not {self.family!r}")
        device, dtype = self._resolved_device()
        self.variant = variant_for(base.meta, dtype)
        started = time.perf_counter()
        try:
            pipe = self.load_pipeline(store, primary.base, getattr(torch, dtype))
            vae_version = primary.version_of("vae")
            if vae_version:  # an fp16-safe VAE, say: published once, named by the release
                load_vae(pipe, store, ComponentRef(primary.model, "vae", vae_version), getattr(torch, dtype))
            adapters = self.load_adapters(pipe, store, releases)
            if device != "cpu":  # loading leaves every module on the CPU already: walking them all again costs ~10 %
                pipe.to(device)
        except LoadError:
            raise
        except Exception as exc:  # diffusers raises many kinds; the worker needs one clear reason
            raise LoadError(f"cannot load {primary}: {type(exc).__name__}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        try:
            limits = limits_of(base.meta)
            tuned = apply_tuning(pipe, base.meta, device)
        except Exception as exc:
            raise LoadError(f"cannot tune {primary} as its meta asks: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        nbytes = resident_bytes(pipe)  # what the loaded modules hold, not the files' size
        resident = ResidentPipeline(
            release=str(primary),
            family=self.family,
            pipeline=pipe,
            device=device,
            dtype=dtype,
            defaults=self.defaults(base.meta),
            load_seconds=seconds,
            nbytes=nbytes,
            adapters=adapters,
            call_kwargs=self.call_kwargs,
            limits=limits,
            tuning=dict(base.meta),
        )
        resident.activate(str(primary))
        if "compile_unet" in tuned:  # compile happens at the first call: do it now, before the worker says warm
            resident.generate(GenerateRequest(prompt="warm-up", seed=0))
        if self.events:
            self.events.emit("L1_LOAD", release=str(primary), releases=",".join(map(str, releases)),
                             adapters=",".join(resident.adapter_names), device=device, bytes=nbytes,
                             seconds=round(seconds, 3), **({"tuning": ",".join(tuned)} if tuned else {}))
        return resident

    def load_adapters(self, pipe: Any, store: SnapshotStore, releases: list[Release]) -> dict[str, tuple[str, ...]]:
        """Each release's LoRA as a named adapter, loaded once however many releases name it."""
        adapters: dict[str, tuple[str, ...]] = {}
        loaded: set[str] = set()
        for release in releases:
            names = []
            for component, version in release.components[1:]:
                if component != "lora":  # a published VAE: loaded with the pipeline, shared by the group
                    continue
                name = adapter_name(version)
                if name not in loaded:
                    load_adapter(pipe, store, ComponentRef(release.model, "lora", version))
                    loaded.add(name)
                names.append(name)
            adapters[str(release)] = tuple(names)
        return adapters

    # -- per family
    @classmethod
    def accepts(cls, meta: dict[str, Any]) -> bool:
        """Whether a base version with this manifest meta is one this builder loads."""
        return meta.get("family") == cls.family and meta.get("layout", "diffusers") in ("diffusers", cls.family)

    def load_pipeline(self, store: SnapshotStore, base: ComponentRef, torch_dtype: Any) -> Any:
        """The base version, a diffusers folder in L2, loaded offline from safetensors only."""
        import diffusers

        return load_folder(getattr(diffusers, self.pipeline_class_name), store.path(base), torch_dtype, self.variant)

    def defaults(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "steps": int(meta.get("default_steps", 30)),
            "guidance": float(meta.get("default_guidance", 7.5)),
            "width": int(meta.get("default_width", DEFAULT_SIZES.get(str(meta.get("family")), 512))),
            "height": int(meta.get("default_height", DEFAULT_SIZES.get(str(meta.get("family")), 512))),
            "guidance_rescale": float(meta.get("default_guidance_rescale", 0.0)),
        }

    @staticmethod
    def call_kwargs(request: GenerateRequest, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """How a job becomes the family's pipeline call; Stable Diffusion's shape unless a family says otherwise."""
        return standard_call_kwargs(request, params, defaults)
