"""An in-memory archive for unit tests: the same contract, no disk, no network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..manifest import Manifest
from ..names import ComponentRef, validate_relpath
from .base import Archive, ObjectInfo, VersionNotFound, sort_versions


class MemoryArchive(Archive):
    def __init__(self) -> None:
        self.url = "memory://"
        self.objects: dict[tuple[ComponentRef, str], bytes] = {}
        self.manifests: dict[ComponentRef, Manifest] = {}

    def list_models(self) -> list[str]:
        return sorted({ref.model for ref in self.manifests})

    def list_components(self, model: str) -> list[str]:
        return sorted({ref.component for ref in self.manifests if ref.model == model})

    def list_versions(self, model: str, component: str) -> list[str]:
        return sort_versions([r.version for r in self.manifests if r.model == model and r.component == component])

    def read_manifest(self, ref: ComponentRef) -> Manifest:
        try:
            return self.manifests[ref]
        except KeyError:
            raise VersionNotFound(f"{ref} is not in the archive {self.url}") from None

    def _get(self, ref: ComponentRef, path: str) -> bytes:
        try:
            return self.objects[(ref, validate_relpath(path))]
        except KeyError:
            raise VersionNotFound(f"{ref}/{path} is not in the archive {self.url}") from None

    def stat(self, ref: ComponentRef, path: str) -> ObjectInfo:
        return ObjectInfo(size=len(self._get(ref, path)))

    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes:
        return self._get(ref, path)[start:end]

    def iter_file(self, ref: ComponentRef, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        data = self._get(ref, path)
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]

    def put_file(self, ref: ComponentRef, path: str, source: Path) -> None:
        self.objects[(ref, validate_relpath(path))] = Path(source).read_bytes()

    def put_manifest(self, manifest: Manifest) -> None:
        manifest.validate()
        self.manifests[manifest.ref] = manifest

    def delete_version(self, ref: ComponentRef) -> None:
        if ref not in self.manifests:
            raise VersionNotFound(f"{ref} is not in the archive {self.url}")
        del self.manifests[ref]
        for key in [k for k in self.objects if k[0] == ref]:
            del self.objects[key]
