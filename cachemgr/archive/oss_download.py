"""Reading from OSS: ranged reads, streaming, and the download engine (parallel ranged GETs written straight into
the file at their offsets, resumable part by part from a checkpoint). Mixed into `OssArchive` (oss.py), whose
oss2 calls, retries and keys it uses.

Integrity is the caller's: every byte is verified against the manifest's sha256 afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import oss2
import requests
import urllib3

from ..names import ComponentRef
from .base import ArchiveError, ArchiveUnavailable, ObjectInfo, Progress

READ_BLOCK = 1 << 20
"""Bytes per socket read: oss2 reads 16 KiB at a time, which bounds throughput on fast links."""

_READ_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, requests.RequestException)


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", text)
    if match:
        return match.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    return type(exc).__name__


class _ShortRead(ConnectionError):
    """The server closed the body before the promised length."""


class _Checkpoint:
    """Which parts of a download are already on disk in `dest`, so an interrupted download resumes."""

    def __init__(self, path: Path | None, state: dict[str, Any]) -> None:
        self.path = path
        self.state = state
        self.done: set[int] = set(state.get("done", ()))
        self.lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path | None, ident: dict[str, Any], fd: int) -> _Checkpoint:
        """Load the checkpoint for `ident` if it still describes the object and the partial file, else start anew."""
        if folder is None:
            return cls(None, dict(ident))
        name = hashlib.sha256(json.dumps([ident["bucket"], ident["key"], ident["dest"]]).encode()).hexdigest()[:32]
        path = folder / f"{name}.download.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        on_disk = os.fstat(fd).st_size
        part = ident["part_size"]
        stale = any(state.get(k) != v for k, v in ident.items()) or any(
            min((i + 1) * part, ident["size"]) > on_disk for i in state.get("done", ())
        )
        if stale:
            state = dict(ident)
        return cls(path, state)

    def mark(self, index: int) -> None:
        with self.lock:
            self.done.add(index)
            if self.path is not None:
                self.state["done"] = sorted(self.done)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(self.state))
                os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _file_target(dest: BinaryIO) -> tuple[int, str] | None:
    """(fd, path) when `dest` is a regular file at offset 0 that accepts positioned writes; else None."""
    try:
        fd = dest.fileno()
        dest.flush()
        if dest.tell() != 0 or not os.path.isfile(str(getattr(dest, "name", ""))):
            return None
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    return fd, os.path.realpath(dest.name)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front: parallel writes into a sparse, growing file cost the filesystem more
    (measured ~1.5x slower on ext4 with 4 streams), and a full disk fails here rather than mid-download."""
    if size and os.fstat(fd).st_size < size:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class OssReads:
    """The reading half of `OssArchive`: it needs `_call`, `_key`, `_sleep`, `stat`, `retries`, `endpoint`,
    `bucket_name`, `part_size`, `threads` and `checkpoint_dir` from the class it is mixed into."""

    def read_range(self, ref: ComponentRef, path: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        key, what = self._key(ref, path), f"{ref}/{path}"
        for attempt in range(self.retries + 1):
            try:
                result = self._open_range(key, start, end, None, f"read {what}", what)
            except ArchiveError as exc:
                cause = exc.__cause__
                if isinstance(cause, oss2.exceptions.ServerError) and cause.status == 416:
                    return b""  # start at or past the end, as a local file read answers
                raise
            complete = False
            try:
                self._check_range(result, start, ref, path)
                data = _body_reader(result).read()
                complete = True
                return data[: end - start]  # a server that ignored the range sent the whole object
            except _READ_ERRORS as exc:
                if attempt == self.retries:
                    raise ArchiveUnavailable(self._interrupted(what, exc)) from exc
                self._sleep(attempt)
            finally:
                _finish(result, complete)
        raise AssertionError("unreachable")

    def _check_range(self, result: Any, start: int, ref: ComponentRef, path: str) -> None:
        """A server that ignores the Range header sends the whole object with 200: refuse to misplace bytes."""
        content_range = result.content_range or ""
        if result.status == 206 and content_range.startswith(f"bytes {start}-"):
            return
        if result.status == 200 and start == 0:
            return
        raise ArchiveError(f"OSS answered {result.status} {content_range!r} to a ranged read of {ref}/{path} from {start}")

    def _open_range(self, key: str, start: int, end: int, etag: str | None, what: str, missing: str) -> Any:
        headers = {"x-oss-range-behavior": "standard"}
        if etag:
            headers["If-Match"] = f'"{etag}"'
        return self._call(what, self._bucket.get_object, key, byte_range=(start, end - 1), headers=headers, missing=missing)

    def iter_file(self, ref: ComponentRef, path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._iter_object(ref, path, self.stat(ref, path), chunk_size)

    def _iter_object(self, ref: ComponentRef, path: str, info: ObjectInfo, chunk_size: int) -> Iterator[bytes]:
        """Stream one object; a dropped connection continues from the last byte received (If-Match pins the ETag)."""
        key, pos, failures = self._key(ref, path), 0, 0
        while pos < info.size:
            result = self._open_range(key, pos, info.size, info.etag, f"read {ref}/{path}", f"{ref}/{path}")
            complete = False
            try:
                self._check_range(result, pos, ref, path)
                reader = _body_reader(result)
                while pos < info.size:
                    data = reader.read(min(chunk_size, info.size - pos))
                    if not data:
                        raise _ShortRead(f"body ended at byte {pos} of {info.size}")
                    pos += len(data)
                    failures = 0
                    complete = pos >= info.size
                    yield data
            except _READ_ERRORS as exc:
                failures += 1
                if failures > self.retries:
                    raise ArchiveUnavailable(self._interrupted(f"{ref}/{path}", exc)) from exc
                self._sleep(failures - 1)
            finally:
                _finish(result, complete)

    def _interrupted(self, what: str, exc: BaseException) -> str:
        return f"reading {what} from OSS endpoint {self.endpoint} kept failing ({_short_reason(exc)}) after {self.retries + 1} tries"

    def download(self, ref: ComponentRef, path: str, dest: BinaryIO, progress: Progress | None = None,
                 size: int | None = None) -> None:
        """Write the whole file into `dest`: parallel ranged GETs straight into the file for large objects.

        When `dest` is a regular file opened at offset 0 and `checkpoint_dir` is set, finished parts are recorded
        there; after an interruption, calling again with the same partial file (reopened without truncating, e.g.
        mode "r+b") fetches only the missing parts. Integrity is the caller's job: verify sha256 afterwards.
        A file the manifest says fits in one part is streamed without the HEAD: there is nothing to resume, and
        the caller's sha256 check stands in for the ETag a checkpoint would pin.
        """
        if size is not None and (size < 2 * self.part_size or self.threads <= 1):
            self._stream_into(ref, path, dest, ObjectInfo(size=size), progress)
            return
        info = self.stat(ref, path)
        target = _file_target(dest)
        if target is None:
            for chunk in self._iter_object(ref, path, info, READ_BLOCK):
                dest.write(chunk)
                if progress:
                    progress(len(chunk))
            return
        fd, dest_path = target
        size = info.size
        part_size = self.part_size if size >= 2 * self.part_size and self.threads > 1 else max(size, 1)
        ident = {"bucket": self.bucket_name, "key": self._key(ref, path), "etag": info.etag, "size": size,
                 "part_size": part_size, "dest": dest_path}
        checkpoint = _Checkpoint.open(self.checkpoint_dir, ident, fd)
        parts = [(i, start, min(start + part_size, size)) for i, start in enumerate(range(0, size, part_size))]
        todo = [p for p in parts if p[0] not in checkpoint.done]
        _preallocate(fd, size)
        lock = threading.Lock()

        def report(n: int) -> None:
            if progress:
                with lock:
                    progress(n)

        already = sum(end - start for i, start, end in parts if i in checkpoint.done)
        if already:
            report(already)
        failed = threading.Event()

        def fetch(part: tuple[int, int, int]) -> None:
            index, start, end = part
            if failed.is_set():
                return  # parts already running finish, no new one starts
            try:
                self._fetch_into(ident["key"], info.etag, fd, start, end, report, f"{ref}/{path}")
            except BaseException:
                failed.set()
                raise
            checkpoint.mark(index)

        errors: list[BaseException] = []
        with ThreadPoolExecutor(min(self.threads, max(1, len(todo))), thread_name_prefix="oss-get") as pool:
            for future in [pool.submit(fetch, p) for p in todo]:
                if future.exception() is not None:
                    errors.append(future.exception())  # type: ignore[arg-type]
        if errors:
            first = errors[0]
            if isinstance(first, ArchiveError):
                where = f"; the next call resumes from {checkpoint.path}" if checkpoint.path else ""
                raise type(first)(f"{first} ({len(checkpoint.done)} of {len(parts)} parts done{where})") from first
            raise first
        os.ftruncate(fd, size)
        dest.seek(size)
        checkpoint.remove()

    def _stream_into(self, ref: ComponentRef, path: str, dest: BinaryIO, info: ObjectInfo,
                     progress: Progress | None) -> None:
        if _file_target(dest) is not None:
            dest.seek(0)
        for chunk in self._iter_object(ref, path, info, READ_BLOCK):
            dest.write(chunk)
            if progress:
                progress(len(chunk))
        truncate = getattr(dest, "truncate", None)
        if truncate is not None and _file_target(dest) is not None:
            truncate()  # a longer partial file from an earlier try must not outlive this one

    def _fetch_into(self, key: str, etag: str | None, fd: int, start: int, end: int,
                    report: Callable[[int], None], what: str) -> None:
        """Bytes [start, end) into `fd` at the same offsets; a dropped connection resumes where it stopped."""
        buf = memoryview(bytearray(min(READ_BLOCK, max(1, end - start))))
        pos, failures = start, 0
        while pos < end:
            result = self._open_range(key, pos, end, etag, f"read {what}", what)
            complete = False
            try:
                if not (result.status == 206 and (result.content_range or "").startswith(f"bytes {pos}-")):
                    if not (result.status == 200 and pos == 0):
                        raise ArchiveError(f"OSS answered {result.status} {result.content_range!r} to a ranged read of {what}")
                reader = _body_reader(result)
                while pos < end:
                    n = reader.readinto(buf[: min(len(buf), end - pos)])
                    if not n:
                        raise _ShortRead(f"body ended at byte {pos} of {end}")
                    _pwrite_all(fd, buf[:n], pos)
                    pos += n
                    failures = 0
                    report(n)
                complete = True
            except _READ_ERRORS as exc:
                failures += 1
                if failures > self.retries:
                    raise ArchiveUnavailable(self._interrupted(what, exc)) from exc
                self._sleep(failures - 1)
            finally:
                _finish(result, complete)


class _ReadAdapter:
    """`readinto`/`read` over oss2's response when the raw socket stream is not reachable."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def read(self, n: int | None = None) -> bytes:
        return self.result.resp.response.raw.read(n)

    def readinto(self, buf: memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _body_reader(result: Any) -> Any:
    """The response body as a file with `readinto`, read in large blocks straight from the socket.

    oss2 reads 16 KiB at a time through requests' iterator and a CRC adapter; reading the underlying
    http.client response into a reused buffer is several times faster. Falls back to urllib3's `read`.
    """
    raw = result.resp.response.raw
    fp = getattr(raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and not result.headers.get("Content-Encoding"):
        return fp
    return _ReadAdapter(result)


def _finish(result: Any, complete: bool) -> None:
    """Hand a connection whose body was read to its end back to the pool; close any other.

    Reusing a connection with unread body bytes would feed them to the next response, so "complete" must be
    confirmed by http.client itself (it closes its side once Content-Length bytes were read).
    """
    raw = result.resp.response.raw
    fp = getattr(raw, "_fp", None)
    if complete and isinstance(fp, http.client.HTTPResponse) and fp.isclosed() and hasattr(raw, "release_conn"):
        raw.release_conn()
    else:
        result.close()
