"""The embedded default L3: a directory laid out exactly like the bucket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..manifest import MANIFEST_NAME, Manifest, ManifestError
from ..names import COMPONENT_PATTERN, NAME_PATTERN, ComponentRef, validate_relpath
from .base import Archive, ArchiveError, ObjectInfo, VersionNotFound, sort_versions


class LocalArchive(Archive):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def _dir(self, ref: ComponentRef) -> Path:
        return self.root / ref.model / ref.component / ref.version

    def _file(self, ref: ComponentRef, path: str) -> Path:
        return self._dir(ref) / validate_relpath(path)

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))

    def list_components(self, model: str) -> list[str]:
        folder = self.root / model
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and COMPONENT_PATTERN.fullmatch(p.name))

    def list_versions(self, model: str, component: str) -> list[str]:
        folder = self.root / model / component
        if not folder.is_dir():
            return []
        return sort_versions(
            [p.name for p in folder.iterdir() if NAME_PATTERN.fullmatch(p.name) and (p / MANIFEST_NAME).is_file()]
        )

    def read_manifest(self, ref: ComponentRef) -> Manifest:
        path = self._dir(ref) / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise VersionNotFound(f"{ref} is not in the archive {self.url}") from None
        manifest = Manifest.from_json(text)
        if manifest.ref != ref:
            raise ManifestError(f"manifest at {ref} describes {manifest.ref}")
        return manifest

    def stat(self, ref: ComponentRef, path: str) -> ObjectInfo:
        try:
            return ObjectInfo(size=self._file(ref, path).stat().st_size)
        except FileNotFoundError:
            raise VersionNotFound(f"{ref}/{path} is not in the archive {self.url}") from None

    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes:
        with open(self._file(ref, path), "rb") as fh:
            fh.seek(start)
            return fh.read(max(0, end - start))

    def iter_file(self, ref: ComponentRef, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            fh = open(self._file(ref, path), "rb")
        except FileNotFoundError:
            raise VersionNotFound(f"{ref}/{path} is not in the archive {self.url}") from None
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def _atomic_write(self, target: Path, source: Path | None = None, data: bytes | None = None) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".incomplete")
        try:
            with os.fdopen(fd, "wb") as out:
                if source is not None:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                else:
                    out.write(data or b"")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put_file(self, ref: ComponentRef, path: str, source: Path) -> None:
        self._atomic_write(self._file(ref, path), source=source)

    def put_manifest(self, manifest: Manifest) -> None:
        manifest.validate()
        self._atomic_write(self._dir(manifest.ref) / MANIFEST_NAME, data=manifest.to_json().encode())

    def delete_version(self, ref: ComponentRef) -> None:
        folder = self._dir(ref)
        if not folder.exists():
            raise VersionNotFound(f"{ref} is not in the archive {self.url}")
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(folder)
        if not folder.parent.exists():
            raise ArchiveError(f"{ref}: component folder vanished while deleting")
