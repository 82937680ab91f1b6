"""L3: the version tree of every component. One small interface, several stores behind it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..manifest import MANIFEST_NAME, Manifest, build_manifest
from ..names import ComponentRef, version_sort_key
from .piecehash import PieceHashes

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred."""


class ArchiveError(RuntimeError):
    """Something the archive could not do; the message names what to check."""


class VersionNotFound(ArchiveError):
    pass


class ArchiveUnavailable(ArchiveError):
    """The archive could not be reached (network, credentials, bucket)."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None = None
    crc64: str | None = None


class Archive:
    """The L3 contract. Paths are `<model>/<component>/<version>/<file>`; a version exists once its
    manifest does, and the manifest is written last, so a half-published version is never listed."""

    url: str = ""

    # -- reading
    def list_models(self) -> list[str]:
        raise NotImplementedError

    def list_components(self, model: str) -> list[str]:
        raise NotImplementedError

    def list_versions(self, model: str, component: str) -> list[str]:
        """Published versions, oldest first (natural version order)."""
        raise NotImplementedError

    def read_manifest(self, ref: ComponentRef) -> Manifest:
        raise NotImplementedError

    def stat(self, ref: ComponentRef, path: str) -> ObjectInfo:
        raise NotImplementedError

    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one file."""
        raise NotImplementedError

    def iter_file(self, ref: ComponentRef, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        raise NotImplementedError

    def download(self, ref: ComponentRef, path: str, dest: BinaryIO, progress: Progress | None = None,
                 size: int | None = None, hashes: PieceHashes | None = None) -> None:
        """Write the whole file to `dest` (from its current position, which callers leave at 0). Integrity is the
        caller's job (sha256 against the manifest).

        `size`, when the caller knows it from the manifest, lets a remote store skip asking for it. `hashes` collects
        the sha256 of the manifest's pieces from the bytes as they are written, so the caller need not read them
        again; a piece it has no digest for must be hashed from the file."""
        stream = hashes.stream(0) if hashes is not None else None
        for chunk in self.iter_file(ref, path):
            dest.write(chunk)
            if stream is not None:
                stream.update(chunk)
            if progress:
                progress(len(chunk))

    # -- writing
    def put_file(self, ref: ComponentRef, path: str, source: Path) -> None:
        raise NotImplementedError

    def put_manifest(self, manifest: Manifest) -> None:
        raise NotImplementedError

    def delete_version(self, ref: ComponentRef) -> None:
        """Manifest first (the version disappears from listings), then its files."""
        raise NotImplementedError

    # -- built on the above
    def has_version(self, ref: ComponentRef) -> bool:
        return ref.version in self.list_versions(ref.model, ref.component)

    def latest_version(self, model: str, component: str) -> str | None:
        versions = self.list_versions(model, component)
        return versions[-1] if versions else None

    def publish(self, ref: ComponentRef, source: Path, meta: dict | None = None, progress: Progress | None = None) -> Manifest:
        """Upload every file of `source`, then the manifest. Refuses to overwrite a published version."""
        if self.has_version(ref):
            raise ArchiveError(f"{ref} is already published in {self.url}; publish a new version instead")
        manifest = build_manifest(ref, Path(source), meta)
        for entry in manifest.files:
            self.put_file(ref, entry.path, Path(source) / entry.path)
            if progress:
                progress(entry.size)
        self.put_manifest(manifest)
        return manifest


def sort_versions(versions: list[str]) -> list[str]:
    return sorted(versions, key=version_sort_key)


__all__ = [
    "MANIFEST_NAME",
    "Archive",
    "ArchiveError",
    "ArchiveUnavailable",
    "ObjectInfo",
    "PieceHashes",
    "Progress",
    "VersionNotFound",
    "sort_versions",
]
