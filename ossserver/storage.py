"""The server's disk: one folder per bucket, each object a data file plus a small JSON metadata file.

Data files are never rewritten in place (an overwrite writes a new file and swaps the metadata), so a GET that
already opened the old data keeps reading consistent bytes. An in-memory index of the metadata serves listings.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import crcmod

from .errors import OssError

ISO8601 = "%Y-%m-%dT%H:%M:%S.000Z"
"""How OSS writes times in XML; oss2 parses exactly this shape (always `.000Z`)."""

MIN_PART_SIZE = 100 * 1024
"""OSS refuses multipart uploads whose parts (all but the last) are smaller than 100 KiB."""

COPY_CHUNK = 1 << 20
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def iso8601(ts: float) -> str:
    return time.strftime(ISO8601, time.gmtime(ts))


def new_crc64() -> crcmod.Crc:
    """CRC-64/ECMA-182 as OSS computes it (reflected, all-ones init and xor-out folded into crcmod's form)."""
    return crcmod.Crc(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)


class Digest:
    """Size, MD5 and CRC64 of a body, accumulated while it streams to disk."""

    def __init__(self) -> None:
        self.size = 0
        self.md5 = hashlib.md5()
        self.crc = new_crc64()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.md5.update(chunk)
        self.crc.update(chunk)

    @property
    def etag(self) -> str:
        return self.md5.hexdigest().upper()

    @property
    def content_md5(self) -> str:
        return base64.b64encode(self.md5.digest()).decode()

    @property
    def crc64(self) -> str:
        return str(self.crc.crcValue)


@dataclass
class ObjectMeta:
    key: str
    size: int
    etag: str
    crc64: str
    last_modified: int
    content_type: str
    data: str
    object_type: str = "Normal"
    content_md5: str | None = None
    user_meta: dict[str, str] = field(default_factory=dict)


@dataclass
class PartMeta:
    number: int
    etag: str
    size: int
    crc64: str
    md5: str
    last_modified: int


@dataclass
class ListPage:
    contents: list[ObjectMeta]
    prefixes: list[str]
    truncated: bool
    next_after: str


def _hash(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _successor(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class BucketStore:
    """One bucket: objects, listings and multipart uploads, safe to use from many request threads."""

    def __init__(self, folder: Path, name: str, created: int) -> None:
        self.folder = folder
        self.name = name
        self.created = created
        self.lock = threading.RLock()
        self.objects: dict[str, ObjectMeta] = {}
        self._sorted: list[str] | None = None
        for sub in ("objects", "tmp", "uploads"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for stale in (folder / "tmp").iterdir():
            stale.unlink()
        for meta_file in (folder / "objects").glob("*.json"):
            meta = ObjectMeta(**json.loads(meta_file.read_text()))
            self.objects[meta.key] = meta

    # -- objects
    def new_temp(self) -> Path:
        return self.folder / "tmp" / uuid.uuid4().hex

    def data_path(self, meta: ObjectMeta) -> Path:
        return self.folder / "objects" / meta.data

    def _meta_path(self, key: str) -> Path:
        return self.folder / "objects" / (_hash(key) + ".json")

    def commit(
        self,
        key: str,
        tmp: Path,
        digest: Digest,
        content_type: str,
        user_meta: dict[str, str],
        object_type: str = "Normal",
        etag: str | None = None,
        forbid_overwrite: bool = False,
    ) -> ObjectMeta:
        """Move a fully written temp file into place as `key`; the old data file (if any) is removed after."""
        data_name = f"{_hash(key)}.{uuid.uuid4().hex[:12]}.data"
        meta = ObjectMeta(
            key=key,
            size=digest.size,
            etag=etag or digest.etag,
            crc64=digest.crc64,
            last_modified=int(time.time()),
            content_type=content_type,
            data=data_name,
            object_type=object_type,
            content_md5=digest.content_md5 if object_type == "Normal" else None,
            user_meta=dict(user_meta),
        )
        with self.lock:
            if forbid_overwrite and key in self.objects:
                raise OssError("FileAlreadyExists", Key=key)
            os.replace(tmp, self.data_path(meta))
            _write_json(self._meta_path(key), asdict(meta))
            old = self.objects.get(key)
            self.objects[key] = meta
            if old is None:
                if self._sorted is not None:
                    bisect.insort(self._sorted, key)
            else:
                self.data_path(old).unlink(missing_ok=True)
        return meta

    def head(self, key: str) -> ObjectMeta:
        with self.lock:
            try:
                return self.objects[key]
            except KeyError:
                raise OssError("NoSuchKey", Key=key) from None

    def open(self, key: str) -> tuple[ObjectMeta, BinaryIO]:
        """Metadata and an open data file that stay consistent even if the key is overwritten meanwhile."""
        with self.lock:
            meta = self.head(key)
            return meta, open(self.data_path(meta), "rb")

    def delete(self, key: str) -> None:
        with self.lock:
            meta = self.objects.pop(key, None)
            if meta is None:
                return
            if self._sorted is not None:
                i = bisect.bisect_left(self._sorted, key)
                if i < len(self._sorted) and self._sorted[i] == key:
                    del self._sorted[i]
            self._meta_path(key).unlink(missing_ok=True)
            self.data_path(meta).unlink(missing_ok=True)

    def copy_from(self, source: BucketStore, src_key: str, dst_key: str, replace_meta: dict | None) -> ObjectMeta:
        """Copy the bytes (not a reference) of another object, keeping its ETag as OSS does."""
        meta, fh = source.open(src_key)
        tmp = self.new_temp()
        digest = Digest()
        with fh, open(tmp, "wb") as out:
            while chunk := fh.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        content_type, user_meta = meta.content_type, meta.user_meta
        if replace_meta is not None:
            content_type = replace_meta.get("content_type") or content_type
            user_meta = replace_meta.get("user_meta", {})
        return self.commit(dst_key, tmp, digest, content_type, user_meta, meta.object_type, etag=meta.etag)

    def is_empty(self) -> bool:
        with self.lock:
            return not self.objects

    def list(self, prefix: str, delimiter: str, after: str, max_keys: int) -> ListPage:
        """Keys after `after` under `prefix`; with a delimiter, deeper keys roll up into common prefixes."""
        with self.lock:
            if self._sorted is None:
                self._sorted = sorted(self.objects)
            keys = self._sorted
            i = bisect.bisect_right(keys, after) if after else 0
            if prefix:
                i = max(i, bisect.bisect_left(keys, prefix))
            contents: list[ObjectMeta] = []
            prefixes: list[str] = []
            last = after
            while i < len(keys) and keys[i].startswith(prefix):
                if len(contents) + len(prefixes) >= max_keys:
                    return ListPage(contents, prefixes, True, last)
                key = keys[i]
                cut = key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    if common != after:
                        prefixes.append(common)
                        last = common
                    i = bisect.bisect_left(keys, _successor(common))
                    continue
                contents.append(self.objects[key])
                last = key
                i += 1
            return ListPage(contents, prefixes, False, last)

    # -- multipart uploads
    def _upload_dir(self, upload_id: str, key: str | None = None) -> Path:
        folder = self.folder / "uploads" / upload_id
        if not re.fullmatch(r"[0-9A-F]{32}", upload_id) or not (folder / "upload.json").is_file():
            raise OssError("NoSuchUpload", UploadId=upload_id)
        if key is not None and json.loads((folder / "upload.json").read_text())["key"] != key:
            raise OssError("NoSuchUpload", UploadId=upload_id)
        return folder

    def initiate(self, key: str, content_type: str, user_meta: dict[str, str]) -> str:
        upload_id = uuid.uuid4().hex.upper()
        folder = self.folder / "uploads" / upload_id
        folder.mkdir()
        info = {"key": key, "initiated": int(time.time()), "content_type": content_type, "user_meta": user_meta}
        _write_json(folder / "upload.json", info)
        return upload_id

    def put_part(self, upload_id: str, key: str, number: int, tmp: Path, digest: Digest) -> PartMeta:
        if not 1 <= number <= 10000:
            tmp.unlink(missing_ok=True)
            raise OssError("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive.")
        folder = self._upload_dir(upload_id, key)
        part = PartMeta(number, digest.etag, digest.size, digest.crc64, digest.md5.hexdigest(), int(time.time()))
        os.replace(tmp, folder / f"{number:05d}.part")
        _write_json(folder / f"{number:05d}.json", asdict(part))
        return part

    def parts(self, upload_id: str, key: str) -> list[PartMeta]:
        folder = self._upload_dir(upload_id, key)
        return [PartMeta(**json.loads(p.read_text())) for p in sorted(folder.glob("?????.json"))]

    def uploads(self) -> list[tuple[str, str, int]]:
        found = []
        for folder in (self.folder / "uploads").iterdir():
            info = json.loads((folder / "upload.json").read_text())
            found.append((info["key"], folder.name, info["initiated"]))
        return sorted(found)

    def complete(self, upload_id: str, key: str, requested: Iterable[tuple[int, str]]) -> ObjectMeta:
        """Join the named parts in order into one object; the ETag is OSS's multipart form `MD5(md5s)-N`."""
        folder = self._upload_dir(upload_id, key)
        info = json.loads((folder / "upload.json").read_text())
        have = {p.number: p for p in self.parts(upload_id, key)}
        chosen: list[PartMeta] = []
        for number, etag in requested:
            if chosen and number <= chosen[-1].number:
                raise OssError("InvalidPartOrder", UploadId=upload_id)
            part = have.get(number)
            if part is None or part.etag != etag.strip('"').upper():
                raise OssError("InvalidPart", UploadId=upload_id, PartNumber=str(number))
            chosen.append(part)
        if not chosen:
            raise OssError("MalformedXML", "The CompleteMultipartUpload request names no part.")
        for part in chosen[:-1]:
            if part.size < MIN_PART_SIZE:
                raise OssError("EntityTooSmall", UploadId=upload_id, PartNumber=str(part.number))
        tmp = self.new_temp()
        digest = Digest()
        with open(tmp, "wb") as out:
            for part in chosen:
                with open(folder / f"{part.number:05d}.part", "rb") as src:
                    while chunk := src.read(COPY_CHUNK):
                        digest.crc.update(chunk)
                        digest.size += len(chunk)
                        out.write(chunk)
        joined = hashlib.md5(b"".join(bytes.fromhex(p.md5) for p in chosen)).hexdigest().upper()
        meta = self.commit(
            key, tmp, digest, info["content_type"], info["user_meta"], "Multipart", etag=f"{joined}-{len(chosen)}"
        )
        shutil.rmtree(folder, ignore_errors=True)
        return meta

    def abort(self, upload_id: str, key: str) -> None:
        shutil.rmtree(self._upload_dir(upload_id, key))


class Storage:
    """All buckets under one root directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.buckets: dict[str, BucketStore] = {}
        for info_file in self.root.glob("*/bucket.json"):
            info = json.loads(info_file.read_text())
            self.buckets[info["name"]] = BucketStore(info_file.parent, info["name"], info["created"])

    def create_bucket(self, name: str) -> BucketStore:
        if not BUCKET_NAME.fullmatch(name):
            raise OssError("InvalidBucketName", BucketName=name)
        with self.lock:
            if name in self.buckets:
                raise OssError("BucketAlreadyExists", BucketName=name)
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            created = int(time.time())
            _write_json(folder / "bucket.json", {"name": name, "created": created})
            bucket = self.buckets[name] = BucketStore(folder, name, created)
            return bucket

    def bucket(self, name: str) -> BucketStore:
        with self.lock:
            try:
                return self.buckets[name]
            except KeyError:
                raise OssError("NoSuchBucket", BucketName=name) from None

    def delete_bucket(self, name: str) -> None:
        bucket = self.bucket(name)
        with self.lock:
            if not bucket.is_empty():
                raise OssError("BucketNotEmpty", BucketName=name)
            del self.buckets[name]
            shutil.rmtree(bucket.folder, ignore_errors=True)

    def list_buckets(self) -> list[BucketStore]:
        with self.lock:
            return [self.buckets[n] for n in sorted(self.buckets)]
