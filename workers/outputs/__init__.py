"""Where generated images go. Results carry a URI, never image bytes."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class OutputStore:
    url: str = ""

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        """Store `data` under `key` atomically (a redelivered job overwrites the same key); return its URI."""
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or ".." in key:
        raise ValueError(f"invalid output key {key!r}")
    return key


class LocalOutputStore(OutputStore):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        target = self._path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target.as_uri()

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))


def open_output_store(url: str, **options: object) -> OutputStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalOutputStore(Path(unquote(parsed.path)))
    if parsed.scheme == "" and url:
        return LocalOutputStore(Path(url))
    if parsed.scheme == "oss":
        from .oss import OssOutputStore

        return OssOutputStore.from_url(url, **options)
    raise ValueError(f"unsupported output URL {url!r}: use file:///path or oss://bucket/prefix")


def read_uri(uri: str) -> bytes:
    """Fetch what a result's image URI points at (file:// here; OSS through its store)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).read_bytes()
    raise ValueError(f"cannot read {uri!r} directly; open its output store")
