"""Model families. Each is one readable module; `builder_for` picks one from a base manifest's family."""

from cachemgr import Release, SnapshotStore

from .base import LoadError, ModelBuilder, group_by_base
from .sd import StableDiffusion, StableDiffusion2
from .sdxl import StableDiffusionXL
from .single_file import SingleFile
from .wuerstchen import Wuerstchen

FAMILIES: dict[str, type[ModelBuilder]] = {
    family.family: family for family in (StableDiffusion, StableDiffusion2, StableDiffusionXL, Wuerstchen, SingleFile)
}


def builder_for(family: str) -> type[ModelBuilder]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise LoadError(f"unknown model family {family!r}; supported: {', '.join(sorted(FAMILIES))}") from None


def family_of(store: SnapshotStore, release: Release) -> str:
    """The builder a base needs: its family, or single-file for a checkpoint published as one file."""
    meta = store.manifest(release.base).meta
    family = meta.get("family")
    if not family:
        raise LoadError(f"{release.base} has no 'family' in its manifest meta; republish it with --family")
    return SingleFile.family if meta.get("layout") == "single-file" else str(family)


__all__ = [
    "FAMILIES",
    "LoadError",
    "ModelBuilder",
    "SingleFile",
    "StableDiffusion",
    "StableDiffusion2",
    "StableDiffusionXL",
    "Wuerstchen",
    "builder_for",
    "family_of",
    "group_by_base",
]
