"""L3 archives behind one interface, chosen by URL: file:///dir, memory://, oss://bucket/prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .base import Archive, ArchiveError, ArchiveUnavailable, ObjectInfo, VersionNotFound
from .local import LocalArchive
from .memory import MemoryArchive


def open_archive(url: str, **options: Any) -> Archive:
    """Open the archive a URL names. `options` carry store-specific settings (OSS endpoint, keys…)."""
    parsed = urlparse(url)
    if options.get("proxy") and parsed.scheme != "oss":
        raise ArchiveError(f"a proxy applies to an oss:// archive only; {url} is read directly: unset FLEET_ARCHIVE_PROXY")
    if parsed.scheme == "file":
        return LocalArchive(Path(unquote(parsed.path)))
    if parsed.scheme == "" and url:
        return LocalArchive(Path(url))
    if parsed.scheme == "memory":
        return MemoryArchive()
    if parsed.scheme == "oss":
        from .oss import OssArchive

        return OssArchive.from_url(url, **options)
    raise ArchiveError(f"unsupported archive URL {url!r}: use file:///path or oss://bucket/prefix")


__all__ = [
    "Archive",
    "ArchiveError",
    "ArchiveUnavailable",
    "LocalArchive",
    "MemoryArchive",
    "ObjectInfo",
    "VersionNotFound",
    "open_archive",
]
