"""Where a model's cache lives: the one value every builder takes through `.with_cache(...)`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .store import SnapshotStore


def default_cache_root() -> Path:
    """The platform's per-user cache folder; callers with settings pass their own root instead."""
    return Path.home() / ".cache" / "warmfleet" / "l2"


@dataclass(frozen=True)
class Cache:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> Cache:
        return cls(Path(path).expanduser().absolute())

    @classmethod
    def default(cls) -> Cache:
        return cls.at(default_cache_root())

    @property
    def store(self) -> SnapshotStore:
        return SnapshotStore(self.root)

    @property
    def checkpoints(self) -> Path:
        """Resumable-download checkpoints live with the cache, never in the home folder."""
        return self.root / "checkpoints"

    @property
    def event_log(self) -> Path:
        return self.root / "events.jsonl"
