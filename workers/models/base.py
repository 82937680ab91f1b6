"""One builder shape for every model family: `Family.builder(model, release=…).with_cache(…).build()`."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Self

from cachemgr import Archive, Cache, EventLog, Release, SnapshotStore
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_release

from ..resident import ResidentPipeline

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def adapter_name(version: str) -> str:
    """peft module names may not contain '.', so v2.3.1 becomes lora_v2_3_1."""
    return "lora_" + version.replace(".", "_").replace("-", "_")


class LoadError(RuntimeError):
    """A release that cannot be loaded (missing or corrupt files, wrong family); the worker stays cold."""


class ModelBuilder:
    family: ClassVar[str] = ""
    pipeline_class_name: ClassVar[str] = ""

    def __init__(self, model: str, release: str | Release | None = None) -> None:
        self.model = model
        self.release = Release.parse(str(release)) if release else None
        self.cache: Cache | None = None
        self.archive: Archive | None = None
        self.device: str | None = None
        self.dtype: str | None = None
        self.events: EventLog | None = None
        if self.release and self.release.model != model:
            raise ValueError(f"release {self.release} is not a release of model {model!r}")

    @classmethod
    def builder(cls, model: str, release: str | Release | None = None) -> Self:
        return cls(model, release)

    def with_cache(self, cache: Cache) -> Self:
        """Where L2 lives for this model. Omitted: the settings' cache root (FLEET_CACHE_ROOT overrides it)."""
        self.cache = cache
        return self

    def with_release(self, release: str | Release) -> Self:
        self.release = Release.parse(str(release))
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
    def _resolved_cache(self) -> Cache:
        if self.cache is not None:
            return self.cache
        from tasks.settings import load_settings

        return Cache.at(load_settings().resolved_cache_root)

    def _resolved_device(self) -> tuple[str, str]:
        if self.device:
            device = self.device
        else:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype or ("float16" if device.startswith("cuda") else "float32")
        return device, dtype

    def ensure_local(self) -> SnapshotStore:
        """L2 first: sync from the archive if given, else insist every component is already on disk."""
        if self.release is None:
            raise LoadError(f"no release given for {self.model}: use .with_release('{self.model}@base-…')")
        store = self._resolved_cache().store
        missing = [ref for ref in self.release.refs() if not store.has(ref)]
        if missing and self.archive is not None:
            sync_release(self.archive, store, self.release, events=self.events)
        elif missing:
            raise LoadError(
                f"{', '.join(map(str, missing))} not in L2 at {store.root}; run `warmfleet sync` or give an archive"
            )
        return store

    def build(self) -> ResidentPipeline:
        import torch

        store = self.ensure_local()
        assert self.release is not None
        base = store.manifest(self.release.base)
        family = base.meta.get("family")
        if family and family != self.family:
            raise LoadError(f"{self.release.base} is a {family!r} model, not {self.family!r}")
        device, dtype = self._resolved_device()
        started = time.perf_counter()
        try:
            pipe = self.load_pipeline(store, self.release.base, getattr(torch, dtype))
            adapters = []
            for component, version in self.release.components[1:]:
                if component == "lora":
                    ref = ComponentRef(self.model, component, version)
                    name = adapter_name(version)
                    pipe.load_lora_weights(
                        str(store.path(ref)), weight_name=LORA_WEIGHT_NAME, adapter_name=name, local_files_only=True
                    )
                    adapters.append(name)
            if adapters:
                pipe.set_adapters(adapters)
            pipe.to(device)
        except LoadError:
            raise
        except Exception as exc:  # diffusers raises many kinds; the worker needs one clear reason
            raise LoadError(f"cannot load {self.release}: {type(exc).__name__}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - started
        nbytes = sum(store.manifest(r).total_size for r in self.release.refs())
        if self.events:
            self.events.emit("L1_LOAD", release=str(self.release), device=device, bytes=nbytes, seconds=round(seconds, 3))
        return ResidentPipeline(
            release=str(self.release),
            family=self.family,
            pipeline=pipe,
            device=device,
            dtype=dtype,
            defaults=self.defaults(base.meta),
            load_seconds=seconds,
            nbytes=nbytes,
        )

    # -- per family
    def load_pipeline(self, store: SnapshotStore, base: ComponentRef, torch_dtype: Any) -> Any:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class_name)
        return cls.from_pretrained(
            str(store.path(base)), local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype
        )

    def defaults(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "steps": int(meta.get("default_steps", 30)),
            "guidance": float(meta.get("default_guidance", 7.5)),
            "width": int(meta.get("default_width", 512)),
            "height": int(meta.get("default_height", 512)),
        }
