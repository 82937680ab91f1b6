"""The cache tiers as a plain library: no Celery, no environment reads. Callers pass settings in."""

from .archive import Archive, ArchiveError, LocalArchive, MemoryArchive, VersionNotFound, open_archive
from .cache import Cache
from .events import EventLog
from .manifest import Manifest, ManifestError, build_manifest
from .names import ComponentRef, InvalidName, Release, queue_for, validate_name
from .store import ChecksumMismatch, SnapshotMissing, SnapshotStore
from .sync import SyncReport, sync_ref, sync_release

__all__ = [
    "Archive",
    "ArchiveError",
    "Cache",
    "ChecksumMismatch",
    "ComponentRef",
    "EventLog",
    "InvalidName",
    "LocalArchive",
    "Manifest",
    "ManifestError",
    "MemoryArchive",
    "Release",
    "SnapshotMissing",
    "SnapshotStore",
    "SyncReport",
    "VersionNotFound",
    "build_manifest",
    "open_archive",
    "queue_for",
    "sync_ref",
    "sync_release",
    "validate_name",
]
