"""L3 on Alibaba OSS through oss2: listings, manifests, multipart uploads; ranged reads and the parallel resumable
downloads are in oss_download.py.

Integrity does not rest on oss2's CRC64 (skipped when a server sends no CRC header, never applied to ranged
reads): callers verify sha256 against the manifest, and `stat` exposes the server's CRC64 to compare with
`crc64_file`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import crcmod
import oss2

from ..manifest import MANIFEST_NAME, Manifest, ManifestError
from ..names import COMPONENT_PATTERN, NAME_PATTERN, ComponentRef, validate_relpath
from ..ossclient import check_proxy, oss_bucket
from .base import Archive, ArchiveError, ArchiveUnavailable, ObjectInfo, VersionNotFound, sort_versions
from .oss_download import READ_BLOCK, OssReads, _short_reason

T = TypeVar("T")

DEFAULT_PART_SIZE = 32 << 20
DEFAULT_THREADS = 4
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidSecurityToken", "SecurityTokenExpired"}


def crc64_file(path: Path | str) -> str:
    """CRC-64/ECMA of a file as OSS reports it in `x-oss-hash-crc64ecma` (a decimal string)."""
    crc = crcmod.Crc(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_BLOCK):
            crc.update(chunk)
    return str(crc.crcValue)


class OssArchive(OssReads, Archive):
    """The archive in an OSS bucket under a prefix: `oss://bucket/prefix/<model>/<component>/<version>/<file>`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str,
        access_key_id: str | None = None,
        access_key_secret: str | None = None,
        security_token: str | None = None,
        connect_timeout: float = 10.0,
        retries: int = 3,
        retry_backoff: float = 0.5,
        checkpoint_dir: Path | str | None = None,
        is_path_style: bool | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        threads: int = DEFAULT_THREADS,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        proxy: str | None = None,
    ) -> None:
        if not endpoint:
            raise ArchiveError(
                f"oss://{bucket}/{prefix} needs an endpoint: set FLEET_OSS_ENDPOINT, e.g. https://oss-cn-hangzhou.aliyuncs.com"
            )
        if not oss2.utils.is_valid_bucket_name(bucket):
            raise ArchiveError(f"invalid OSS bucket name {bucket!r}: 3-63 lower-case letters, digits or '-'")
        if bool(access_key_id) != bool(access_key_secret):
            raise ArchiveError("OSS needs both FLEET_OSS_ACCESS_KEY_ID and FLEET_OSS_ACCESS_KEY_SECRET, or neither")
        if part_size < 100 * 1024:
            raise ArchiveError("OSS part_size must be at least 100 KiB (the smallest part OSS accepts)")
        if proxy:
            try:
                check_proxy(proxy)
            except ValueError as exc:
                raise ArchiveError(f"{exc}; check FLEET_ARCHIVE_PROXY") from None
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.url = f"oss://{bucket}/{self.prefix}".rstrip("/")
        self.retries = max(0, retries)
        self.retry_backoff = retry_backoff
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.part_size = part_size
        self.threads = max(1, threads)
        self.multipart_threshold = multipart_threshold
        self._root = self.prefix + "/" if self.prefix else ""
        self._has_token = bool(security_token)
        self._bucket = oss_bucket(bucket, endpoint, access_key_id=access_key_id, access_key_secret=access_key_secret,
                                  security_token=security_token, connect_timeout=connect_timeout,
                                  pool_size=max(10, 2 * self.threads), is_path_style=is_path_style, proxy=proxy)
        self.proxy = proxy

    @classmethod
    def from_url(cls, url: str, **options: Any) -> OssArchive:
        """`oss://bucket/prefix` plus options (endpoint, keys, timeouts, checkpoint_dir...)."""
        parsed = urlparse(url)
        if parsed.scheme != "oss" or not parsed.netloc:
            raise ArchiveError(f"invalid OSS archive URL {url!r}: expected oss://bucket/prefix")
        return cls(parsed.netloc, parsed.path, **options)

    def close(self) -> None:
        self._bucket.session.session.close()

    # -- keys and errors
    def _version_prefix(self, ref: ComponentRef) -> str:
        return f"{self._root}{ref.model}/{ref.component}/{ref.version}/"

    def _key(self, ref: ComponentRef, path: str) -> str:
        return self._version_prefix(ref) + validate_relpath(path)

    def _translate(self, exc: oss2.exceptions.OssError, what: str, missing: str | None) -> ArchiveError:
        """One line a user can act on, naming the bucket, the endpoint and the setting to check."""
        where = f"bucket {self.bucket_name} at {self.endpoint}"
        if isinstance(exc, oss2.exceptions.RequestError):
            return ArchiveUnavailable(
                f"cannot reach OSS endpoint {self.endpoint} ({_short_reason(exc.exception)}) while trying to {what}: "
                "check FLEET_OSS_ENDPOINT and the network"
            )
        if isinstance(exc, oss2.exceptions.InconsistentError):
            return ArchiveError(f"{what}: data was corrupted in transit (CRC64 mismatch with OSS); retry")
        code, status = exc.code or "", exc.status
        if code in CREDENTIAL_CODES:
            keys = "FLEET_OSS_ACCESS_KEY_ID / FLEET_OSS_ACCESS_KEY_SECRET"
            if self._has_token or "Token" in code:
                keys += " / FLEET_OSS_SECURITY_TOKEN"
            return ArchiveUnavailable(f"OSS refused the credentials for {where} ({code}): check {keys}")
        if code == "RequestTimeTooSkewed":
            return ArchiveUnavailable(f"OSS refused requests to {where}: this host's clock is off by over 15 minutes; sync it")
        if status == 403:
            return ArchiveUnavailable(
                f"OSS denied access to {where} ({code or status}) while trying to {what}: check that the key in "
                f"FLEET_OSS_ACCESS_KEY_ID may read and write {self.url}"
            )
        if code == "NoSuchBucket":
            return ArchiveUnavailable(
                f"{where} does not exist: check the bucket in the archive URL {self.url} and the region of FLEET_OSS_ENDPOINT"
            )
        if status == 404 and missing is not None:
            return VersionNotFound(f"{missing} is not in the archive {self.url}")
        if code == "PreconditionFailed":
            return ArchiveError(f"{what}: the object changed in {self.url} meanwhile; retry")
        if isinstance(status, int) and status >= 500:
            return ArchiveUnavailable(
                f"OSS at {self.endpoint} kept failing ({status} {code}) while trying to {what}, {self.retries + 1} tries; "
                "try again later"
            )
        return ArchiveError(f"OSS could not {what} in {self.url}: {status} {code} {exc.message} (request id {exc.request_id})")

    def _retryable(self, exc: oss2.exceptions.OssError) -> bool:
        if isinstance(exc, (oss2.exceptions.RequestError, oss2.exceptions.InconsistentError)):
            return True
        return isinstance(exc.status, int) and exc.status >= 500

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.retry_backoff * (2**attempt))

    def _call(self, what: str, fn: Callable[..., T], *args: Any, missing: str | None = None, **kwargs: Any) -> T:
        """Run one oss2 call, retrying connection errors and 5xx with exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except oss2.exceptions.OssError as exc:
                if attempt == self.retries or not self._retryable(exc):
                    raise self._translate(exc, what, missing) from exc
            self._sleep(attempt)
        raise AssertionError("unreachable")

    def _list(self, prefix: str, delimiter: str = "") -> tuple[list[str], list[str]]:
        keys: list[str] = []
        prefixes: list[str] = []
        token = ""
        while True:
            page = self._call(
                f"list {prefix or '/'}",
                self._bucket.list_objects_v2,
                prefix=prefix,
                delimiter=delimiter,
                continuation_token=token,
                max_keys=1000,
            )
            keys.extend(o.key for o in page.object_list)
            prefixes.extend(page.prefix_list)
            if not page.is_truncated:
                return keys, prefixes
            token = page.next_continuation_token

    # -- reading
    def list_models(self) -> list[str]:
        _, prefixes = self._list(self._root, "/")
        names = (p[len(self._root) : -1] for p in prefixes)
        return sorted(n for n in names if NAME_PATTERN.fullmatch(n))

    def list_components(self, model: str) -> list[str]:
        base = f"{self._root}{model}/"
        _, prefixes = self._list(base, "/")
        return sorted(n for n in (p[len(base) : -1] for p in prefixes) if COMPONENT_PATTERN.fullmatch(n))

    def list_versions(self, model: str, component: str) -> list[str]:
        """Versions whose manifest exists: one listing of the component, not one request per version."""
        base = f"{self._root}{model}/{component}/"
        keys, _ = self._list(base)
        found = []
        for key in keys:
            version, _, rest = key[len(base) :].partition("/")
            if rest == MANIFEST_NAME and NAME_PATTERN.fullmatch(version):
                found.append(version)
        return sort_versions(found)

    def read_manifest(self, ref: ComponentRef) -> Manifest:
        key = self._key(ref, MANIFEST_NAME)

        def fetch() -> bytes:
            with self._bucket.get_object(key) as result:
                return result.read()

        text = self._call(f"read the manifest of {ref}", fetch, missing=str(ref))
        manifest = Manifest.from_json(text)
        if manifest.ref != ref:
            raise ManifestError(f"manifest at {ref} describes {manifest.ref}")
        return manifest

    def stat(self, ref: ComponentRef, path: str) -> ObjectInfo:
        result = self._call(f"stat {ref}/{path}", self._bucket.head_object, self._key(ref, path), missing=f"{ref}/{path}")
        crc = result.server_crc
        return ObjectInfo(size=int(result.content_length or 0), etag=result.etag, crc64=None if crc is None else str(crc))

    # -- writing
    def put_file(self, ref: ComponentRef, path: str, source: Path) -> None:
        """One PUT for small files; multipart (parallel, resumable via checkpoint_dir) from `multipart_threshold`."""
        key, source = self._key(ref, path), Path(source)
        what = f"upload {ref}/{path}"
        if source.stat().st_size < self.multipart_threshold:
            self._call(what, self._bucket.put_object_from_file, key, str(source))
            return
        with tempfile.TemporaryDirectory(prefix="oss-upload-") as scratch:
            root = self.checkpoint_dir if self.checkpoint_dir is not None else Path(scratch)
            store = oss2.ResumableStore(root=str(root), dir="oss-upload")
            self._call(
                what,
                oss2.resumable_upload,
                self._bucket,
                key,
                str(source),
                store=store,
                multipart_threshold=self.multipart_threshold,
                part_size=self.part_size,
                num_threads=self.threads,
            )

    def put_manifest(self, manifest: Manifest) -> None:
        manifest.validate()
        key = self._key(manifest.ref, MANIFEST_NAME)
        data = manifest.to_json().encode()
        self._call(f"publish the manifest of {manifest.ref}", self._bucket.put_object, key, data,
                   headers={"Content-Type": "application/json"})

    def delete_version(self, ref: ComponentRef) -> None:
        """Manifest first (the version leaves listings at once), then the files in batches of 1000."""
        prefix = self._version_prefix(ref)
        keys, _ = self._list(prefix)
        if not keys:
            raise VersionNotFound(f"{ref} is not in the archive {self.url}")
        manifest_key = prefix + MANIFEST_NAME
        if manifest_key in keys:
            self._call(f"delete the manifest of {ref}", self._bucket.delete_object, manifest_key)
        rest = [k for k in keys if k != manifest_key]
        for i in range(0, len(rest), 1000):
            batch = rest[i : i + 1000]
            result = self._call(f"delete the files of {ref}", self._bucket.batch_delete_objects, batch)
            left = set(batch) - set(result.deleted_keys)
            if left:
                raise ArchiveError(f"OSS did not delete {len(left)} files of {ref}, e.g. {sorted(left)[0]}; run the delete again")
