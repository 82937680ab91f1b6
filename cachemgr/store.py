"""L2: version snapshots on a node's local disk, laid out so `ls` explains it.

    blobs/<sha256>                                   content-addressed file bodies
    snapshots/<model>/<component>/<version>/<file>   symlinks into ../blobs (a diffusers folder)
    manifests/<model>/<component>/<version>.json     the verified manifest of each snapshot
    refs/<model>/<component>/latest                  the newest version present (a name, written atomically)
    tmp/                                             private *.incomplete downloads
    locks/                                           best-effort locks that only avoid duplicate downloads

A snapshot folder is built under tmp/ and renamed into place, so it is either absent or complete; a
blob is written to a private temp file, verified against its sha256, then renamed. No reader ever
sees a partial file, and correctness never depends on the locks.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

from .manifest import Manifest, ManifestError
from .names import ComponentRef, validate_relpath, version_sort_key

_PARSED: OrderedDict[tuple[str, int, int, int], Manifest] = OrderedDict()
_PARSED_LOCK = threading.Lock()
_PARSED_KEPT = 16
"""Manifests parsed from L2 files, by (path, inode, size, mtime_ns): see `SnapshotStore.manifest`."""


def forget_manifests() -> None:
    """Drop every parsed manifest kept (a benchmark timing a process's first build of a release)."""
    with _PARSED_LOCK:
        _PARSED.clear()


class ChecksumMismatch(ValueError):
    """Bytes that do not match the manifest: never renamed into the store."""


class SnapshotMissing(LookupError):
    pass


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
"""No space, a file-size limit (RLIMIT_FSIZE) or a quota: all mean the same to an operator."""


class DiskFull(OSError):
    """L2 cannot take more bytes. The temp file was removed and every committed version is untouched."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def disk_full(root: Path, exc: BaseException) -> DiskFull | None:
    """The one clear error for a write that failed for lack of space, even when it arrives wrapped (an archive's
    download error caused by a failed write); None for any other error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DiskFull):
            return seen
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return DiskFull(seen.errno, f"L2 disk full at {root}: free space or lower FLEET_RETENTION_KEEP "
                                        f"({os.strerror(seen.errno)})")
        seen = seen.__cause__ or seen.__context__
    return None


class _HashingWriter:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


@dataclass(frozen=True)
class BlobCheck:
    ref: ComponentRef
    path: str
    sha256: str
    ok: bool
    reason: str = ""


class SnapshotStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- layout
    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.blobs / sha256

    def snapshot_path(self, ref: ComponentRef) -> Path:
        return self.root / "snapshots" / ref.model / ref.component / ref.version

    def manifest_path(self, ref: ComponentRef) -> Path:
        return self.root / "manifests" / ref.model / ref.component / f"{ref.version}.json"

    def _ensure_dirs(self) -> None:
        for d in (self.blobs, self.tmp, self.root / "locks"):
            d.mkdir(parents=True, exist_ok=True)

    # -- reading
    def has(self, ref: ComponentRef, select: Callable[[Manifest], set[str] | None] | None = None) -> bool:
        """The version is on this disk; with `select` (a sync filter), it holds every file the filter needs, so a
        subset kept for one precision does not pass for the whole version (select returning None: all files)."""
        if not (self.snapshot_path(ref).is_dir() and self.manifest_path(ref).is_file()):
            return False
        return select is None or not self.missing(ref, select)

    def missing(self, ref: ComponentRef, select: Callable[[Manifest], set[str] | None]) -> set[str]:
        """The files of a version `select` needs that this disk's (possibly subset) snapshot does not hold."""
        manifest = self.manifest(ref)
        need = select(manifest)
        return set(manifest.version_paths if need is None else need) - {f.path for f in manifest.files}

    def path(self, ref: ComponentRef) -> Path:
        """The snapshot folder of a version: what `from_pretrained(..., local_files_only=True)` is given."""
        if not self.has(ref):
            raise SnapshotMissing(f"{ref} is not in the L2 store at {self.root}; run `warmfleet sync` first")
        return self.snapshot_path(ref)

    def manifest(self, ref: ComponentRef) -> Manifest:
        """The version's manifest. A parsed one is reused while its file is the same file (inode, size, mtime: a
        manifest is only ever replaced by a rename): a build reads the base's and each LoRA's several times, and
        a full-size checkpoint's manifest (a range and hash per tensor) takes ~40 ms to parse. Each caller gets its
        own copy of `meta`, the one mutable part."""
        path = self.manifest_path(ref)
        try:
            st = path.stat()
            key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
            with _PARSED_LOCK:
                parsed = _PARSED.get(key)
                if parsed is not None:
                    _PARSED.move_to_end(key)
            if parsed is None:
                parsed = Manifest.from_json(path.read_text())
                with _PARSED_LOCK:
                    _PARSED[key] = parsed
                    while len(_PARSED) > _PARSED_KEPT:
                        _PARSED.popitem(last=False)
        except FileNotFoundError:
            raise SnapshotMissing(f"{ref} is not in the L2 store at {self.root}") from None
        mine = copy.copy(parsed)
        object.__setattr__(mine, "meta", copy.deepcopy(parsed.meta))
        return mine

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def refs(self) -> list[ComponentRef]:
        out = []
        base = self.root / "manifests"
        if not base.is_dir():
            return out
        for model in sorted(base.iterdir()):
            for component in sorted(p for p in model.iterdir() if p.is_dir()):
                versions = sorted((p.stem for p in component.glob("*.json")), key=version_sort_key)
                for version in versions:
                    ref = ComponentRef(model.name, component.name, version)
                    if self.has(ref):
                        out.append(ref)
        return out

    def versions(self, model: str, component: str) -> list[str]:
        return [r.version for r in self.refs() if r.model == model and r.component == component]

    # -- writing
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 600) -> Iterator[bool]:
        """Best effort: yields True if held. Only avoids two processes downloading the same blob."""
        self._ensure_dirs()
        lock = FileLock(str(self.root / "locks" / f"{name}.lock"))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def add_blob(self, sha256: str, size: int, fill: Callable[[BinaryIO], None]) -> Path:
        """Write a blob through `fill(file)`, verify it, then rename it into place.

        The temp file is private to this call; on any failure it is removed and nothing becomes visible.
        """
        target = self.blob_path(sha256)
        if target.is_file():
            return target
        self._ensure_dirs()
        tmp = self.tmp / f"{sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete"
        try:
            with open(tmp, "wb") as fh:
                writer = _HashingWriter(fh)
                fill(writer)  # type: ignore[arg-type]
                fh.flush()
                os.fsync(fh.fileno())
            if writer.size != size or writer.sha.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"blob {sha256[:12]}…: got {writer.size} bytes with sha256 {writer.sha.hexdigest()[:12]}…, "
                    f"expected {size} bytes; the bytes were discarded"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
            return target
        except OSError as exc:
            full = disk_full(self.root, exc)
            if full is None:
                raise
            raise full from exc
        finally:
            tmp.unlink(missing_ok=True)

    def partial_path(self, sha256: str) -> Path:
        """Where a resumable download of a blob is assembled; used only by the holder of the blob's lock."""
        return self.tmp / f"{self.blob_path(sha256).name}.partial"

    def write_blob(self, sha256: str, size: int, fill: Callable[[BinaryIO], tuple[str, int] | None],
                   resumable: bool = True) -> Path:
        """Assemble a blob in a real file that `fill` may write anywhere in (parallel ranged GETs, copied
        pieces), then hash the whole file and rename it into place only if it matches.

        With `resumable`, the partial file survives an interruption so the next call continues it; callers
        pass resumable=True only while holding the blob's lock. A mismatch always discards the bytes. A `fill`
        that wrote the file sequentially may return the (sha256, size) of exactly what it wrote, sparing a re-read.
        """
        target = self.blob_path(sha256)
        if target.is_file():
            return target
        self._ensure_dirs()
        partial = (self.partial_path(sha256) if resumable
                   else self.tmp / f"{sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete")
        keep = False
        try:
            with open(partial, "r+b" if partial.exists() else "w+b") as fh:
                written = fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            digest, length = written if written is not None else _hash_file(partial)
            if length != size or digest != sha256:
                raise ChecksumMismatch(
                    f"blob {sha256[:12]}…: got {length} bytes with sha256 {digest[:12]}…, expected {size} bytes; "
                    "the bytes were discarded"
                )
            os.chmod(partial, 0o444)
            os.replace(partial, target)
            return target
        except ChecksumMismatch:
            raise
        except BaseException as exc:
            full = disk_full(self.root, exc)
            if full is not None:  # nothing to resume into: give the space back
                raise full from exc
            keep = resumable  # an interrupted download is continued by the next sync, not started over
            raise
        finally:
            if not keep:
                partial.unlink(missing_ok=True)

    def add_blob_from_file(self, source: Path, sha256: str, size: int) -> Path:
        def fill(out: BinaryIO) -> None:
            with open(source, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)

        return self.add_blob(sha256, size, fill)

    def commit_snapshot(self, manifest: Manifest) -> Path:
        """Make a version visible: a folder of links to verified blobs, renamed into place in one step."""
        manifest.validate()
        ref = manifest.ref
        final = self.snapshot_path(ref)
        if self.has(ref):
            return self._extend_snapshot(manifest)
        missing = [f.path for f in manifest.files if not self.has_blob(f.sha256)]
        if missing:
            raise SnapshotMissing(f"{ref}: cannot commit, blobs missing for {', '.join(missing)}")
        self._ensure_dirs()
        staging = Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"snapshot-{ref.version}-", suffix=".incomplete"))
        tmp_manifest = self.manifest_path(ref).with_suffix(f".{uuid.uuid4().hex[:8]}.incomplete")
        try:
            for entry in manifest.files:
                link = staging / validate_relpath(entry.path)
                link.parent.mkdir(parents=True, exist_ok=True)
                depth = len(Path(entry.path).parts) + 3  # <file parts>/version/component/model → snapshots/
                link.symlink_to(Path(*([".."] * (depth + 0))) / "blobs" / entry.sha256)
            manifest_file = self.manifest_path(ref)
            manifest_file.parent.mkdir(parents=True, exist_ok=True)
            tmp_manifest.write_text(manifest.to_json())
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # someone else won the race: theirs is identical
                    raise
            os.replace(tmp_manifest, manifest_file)
        except OSError as exc:
            full = disk_full(self.root, exc)
            if full is None:
                raise
            raise full from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            tmp_manifest.unlink(missing_ok=True)  # only our own: a concurrent commit's temp file is not ours
        self._update_latest(ref.model, ref.component)
        return final

    def _extend_snapshot(self, manifest: Manifest) -> Path:
        """Add the files a wider subset of a present version brings (e.g. the fp32 weights beside the fp16 ones a
        node kept): each link appears in one step, the wider manifest is written last."""
        ref = manifest.ref
        final = self.snapshot_path(ref)
        have = {f.path for f in self.manifest(ref).files}
        new = [f for f in manifest.files if f.path not in have]
        if not new:
            return final
        missing = [f.path for f in new if not self.has_blob(f.sha256)]
        if missing:
            raise SnapshotMissing(f"{ref}: cannot extend, blobs missing for {', '.join(missing)}")
        for entry in new:
            link = final / validate_relpath(entry.path)
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.incomplete")
            tmp.symlink_to(Path(*([".."] * (len(Path(entry.path).parts) + 3))) / "blobs" / entry.sha256)
            os.replace(tmp, link)
        tmp_manifest = self.manifest_path(ref).with_suffix(f".{uuid.uuid4().hex[:8]}.incomplete")
        tmp_manifest.write_text(manifest.to_json())
        os.replace(tmp_manifest, self.manifest_path(ref))
        return final

    def remove_snapshot(self, ref: ComponentRef) -> None:
        """Unlink a version (manifest first, so it stops being listed). Blobs are left to the audit's GC."""
        self.manifest_path(ref).unlink(missing_ok=True)
        shutil.rmtree(self.snapshot_path(ref), ignore_errors=True)
        self._update_latest(ref.model, ref.component)

    def latest(self, model: str, component: str) -> str | None:
        """The newest version of a component on this disk, as its ref says (None when there is none)."""
        try:
            return (self.root / "refs" / model / component / "latest").read_text().strip() or None
        except FileNotFoundError:
            return None

    def _update_latest(self, model: str, component: str) -> None:
        versions = self.versions(model, component)
        ref = self.root / "refs" / model / component / "latest"
        if not versions:
            ref.unlink(missing_ok=True)
            return
        _write_text_atomic(ref, versions[-1] + "\n")

    # -- checking
    def check(self, ref: ComponentRef, trust_seconds: float = 0.0, stamp: bool = True) -> list[BlobCheck]:
        """Re-hash every blob of a snapshot against its manifest; each blob that passes gets a stamp of its file's
        identity (size, inode, mtime, ctime). With `trust_seconds`, a blob stamped less than that long ago whose file
        is unchanged since (any write, truncation, replacement or chmod moves its ctime, which no one can set back)
        is not read again: a worker's restart then costs no pass over a multi-GB release that the nightly audit has
        re-hashed. Only corruption that bypasses the filesystem (media bit rot) waits for the next full check.
        `stamp=False` writes nothing (a dry run)."""
        manifest = self.manifest(ref)
        results = []
        for entry in manifest.files:
            blob = self.blob_path(entry.sha256)
            if not blob.is_file():
                results.append(BlobCheck(ref, entry.path, entry.sha256, False, "missing"))
                continue
            link = self.snapshot_path(ref) / entry.path
            if not link.exists() or link.resolve() != blob.resolve():
                results.append(BlobCheck(ref, entry.path, entry.sha256, False, "broken link"))
                continue
            if trust_seconds > 0 and self._stamped(entry.sha256, blob, trust_seconds):
                results.append(BlobCheck(ref, entry.path, entry.sha256, True, "unchanged since verified"))
                continue
            identity = _identity(blob)
            digest, size = _hash_file(blob)
            if digest != entry.sha256 or size != entry.size:
                self._stamp_path(entry.sha256).unlink(missing_ok=True)
                results.append(BlobCheck(ref, entry.path, entry.sha256, False, "checksum mismatch"))
            else:
                if stamp and _identity(blob) == identity:  # not written to while it was read
                    self._stamp(entry.sha256, identity)
                results.append(BlobCheck(ref, entry.path, entry.sha256, True))
        return results

    def _stamp_path(self, sha256: str) -> Path:
        return self.root / "verified" / sha256

    def _stamp(self, sha256: str, identity: str) -> None:
        _write_text_atomic(self._stamp_path(sha256), f"{time.time()!r} {identity}\n")  # exact: never ahead of now

    def _stamped(self, sha256: str, blob: Path, trust_seconds: float) -> bool:
        try:
            at, identity = self._stamp_path(sha256).read_text().split(" ", 1)
            age = time.time() - float(at)  # a stamp from the future (the clock stepped back) is not trusted
            return 0 <= age < trust_seconds and identity.strip() == _identity(blob)
        except (OSError, ValueError):
            return False

    def remove_blob(self, sha256: str) -> None:
        """A blob no snapshot refers to any more goes, and its verified stamp with it."""
        self.blob_path(sha256).unlink(missing_ok=True)
        self._stamp_path(sha256).unlink(missing_ok=True)

    def quarantine_blob(self, sha256: str) -> Path | None:
        """Move a corrupt blob aside so the next sync fetches it again; kept for inspection."""
        blob = self.blob_path(sha256)
        if not blob.exists():
            return None
        qdir = self.root / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / f"{sha256}.{uuid.uuid4().hex[:8]}"
        os.replace(blob, dest)
        return dest


def _write_text_atomic(path: Path, text: str) -> None:
    """A small file replaced whole by a rename: a reader sees the old text or the new, never part of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _identity(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def manifest_matches(manifest: Manifest, ref: ComponentRef) -> Manifest:
    if manifest.ref != ref:
        raise ManifestError(f"manifest for {ref} describes {manifest.ref}")
    return manifest
