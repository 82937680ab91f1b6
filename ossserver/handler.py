"""One HTTP request against the OSS REST dialect: parse, authenticate, route, answer.

Bodies stream between the socket and disk in 1 MiB chunks (GETs use sendfile), so object size is bounded by
the disk, not by memory.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import xmlbody
from .bucket_ops import BucketOps
from .errors import OssError
from .link import CHUNK as LINK_CHUNK
from .object_ops import ObjectOps
from .protocol import (
    CHUNK,
    MAX_KEY_BYTES,
    MAX_XML_BODY,
    Request,
)
from .signing import check_request
from .storage import BucketStore, Digest

if TYPE_CHECKING:
    from .server import OssServer

log = logging.getLogger(__name__)


class OssHandler(BucketOps, ObjectOps, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls
    server_version = "AliyunOSS"
    sys_version = ""

    @property
    def oss(self) -> OssServer:
        return self.server.oss  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        self.oss._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.oss._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- plumbing
    def _handle(self, method: str) -> None:
        self.request_id = hashlib.md5(f"{time.time_ns()}{id(self)}".encode()).hexdigest()[:24].upper()
        self._body_done = not self._has_body()
        self._host = self.headers.get("Host", "127.0.0.1")
        req = None
        try:
            req = self._parse(method)
            self.oss.link.request()
            self.oss._before(req, self.headers.get("Range"))
            if self.oss.credentials:
                check_request(self.oss.credentials, method, self.headers, req.params, req.bucket, req.key)
            self._route(req)
        except OssError as exc:
            self._send_error(exc, req)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception:
            log.error("OSS test server failed on %s %s\n%s", method, self.path, traceback.format_exc())
            self._send_error(OssError("InternalError"), req)
        if not self._body_done:
            self.close_connection = True

    def _parse(self, method: str) -> Request:
        parts = urlsplit(self.path)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        path = parts.path.lstrip("/")
        if not path:
            return Request(method, None, "", params)
        bucket, _, key = path.partition("/")
        return Request(method, unquote(bucket), unquote(key), params)

    def _has_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return True
        return int(self.headers.get("Content-Length") or 0) > 0

    def _iter_body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                yield from self._read_exactly(size)
                self.rfile.readline(1024)
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
        self._body_done = True

    def _read_exactly(self, remaining: int) -> Iterator[bytes]:
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, LINK_CHUNK if self.oss.link.up.rate else CHUNK))
            if not chunk:
                raise ConnectionResetError("client closed the connection mid-body")
            if self.oss.link.up.rate:
                self.oss.link.up.take(len(chunk))
            remaining -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        data = bytearray()
        for chunk in self._iter_body():
            data += chunk
            if len(data) > MAX_XML_BODY:
                raise OssError("MalformedXML", "The request document is too large.")
        return bytes(data)

    def _receive(self, bucket: BucketStore) -> tuple[Path, Digest]:
        """Stream the body to a temp file; check Content-MD5 when the client sent one."""
        tmp = bucket.new_temp()
        digest = Digest()
        try:
            with open(tmp, "wb") as out:
                for chunk in self._iter_body():
                    digest.update(chunk)
                    out.write(chunk)
            expected = self.headers.get("Content-MD5")
            if expected and expected != digest.content_md5:
                raise OssError("InvalidDigest", ContentMD5=expected)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest

    def _send(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"",
              content_type: str | None = "application/xml") -> None:
        self.send_response(status)
        self.send_header("x-oss-request-id", self.request_id)
        if body and content_type:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not headers or "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        if not self._body_done:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self, limit: int = 16 << 20) -> None:
        """Read and drop the body of a refused request, so the client reads the error rather than a reset."""
        length = self.headers.get("Content-Length")
        if self._body_done or not length or not length.isdigit() or int(length) > limit:
            return
        try:
            for _ in self._iter_body():
                pass
        except OSError:
            self._body_done = False

    def _send_error(self, exc: OssError, req: Request | None) -> None:
        self._drain()
        host_id = f"{req.bucket}.{self._host}" if req and req.bucket else self._host
        extra = dict(exc.extra)
        if req and req.bucket and exc.code in ("NoSuchBucket",):
            extra.setdefault("BucketName", req.bucket)
        body = xmlbody.error(exc.code, exc.message, self.request_id, host_id, extra)
        if self.command == "HEAD":
            self._send(exc.status, {"x-oss-err": base64.b64encode(body).decode(), "x-oss-ec": "0000-00000000"})
        else:
            self._send(exc.status, body=body)

    # -- routing
    def _route(self, req: Request) -> None:
        p, m = req.params, req.method
        if req.bucket is None:
            if m == "GET":
                return self._list_buckets(req)
            raise OssError("MethodNotAllowed")
        if not req.key:
            if m == "PUT" and not p.keys() - {"acl"}:
                return self._create_bucket(req)
            if m == "DELETE" and not p:
                return self._delete_bucket(req)
            if m == "GET" and "uploads" in p:
                return self._list_uploads(req)
            if m == "GET" and p.get("list-type") == "2":
                return self._list_objects(req, v2=True)
            if m == "GET" and not p.keys() & {"acl", "location", "bucketInfo", "stat", "cors", "lifecycle", "versions"}:
                return self._list_objects(req, v2=False)
            if m == "POST" and "delete" in p:
                return self._batch_delete(req)
            raise OssError("NotImplemented", f"{m} on a bucket with {sorted(p)} is not implemented by this server.")
        if len(req.key.encode()) > MAX_KEY_BYTES or req.key.startswith(("/", "\\")):
            raise OssError("InvalidObjectName", Key=req.key)
        if m == "PUT" and "uploadId" in p and "partNumber" in p:
            return self._upload_part(req)
        if m == "PUT" and not p.keys() - {"x-oss-process"}:
            if self.headers.get("x-oss-copy-source"):
                return self._copy_object(req)
            return self._put_object(req)
        if m in ("GET", "HEAD") and "uploadId" in p:
            return self._list_parts(req)
        if m in ("GET", "HEAD") and not p.keys() & {"acl", "symlink", "tagging", "x-oss-process"}:
            return self._get_object(req)
        if m == "DELETE" and "uploadId" in p:
            self._bucket(req).abort(p["uploadId"], req.key)
            return self._send(204)
        if m == "DELETE" and not p.keys() - {"versionId"}:
            self._bucket(req).delete(req.key)
            return self._send(204)
        if m == "POST" and "uploads" in p:
            return self._initiate(req)
        if m == "POST" and "uploadId" in p:
            return self._complete(req)
        raise OssError("NotImplemented", f"{m} on an object with {sorted(p)} is not implemented by this server.")

    def _bucket(self, req: Request) -> BucketStore:
        assert req.bucket is not None
        return self.oss.storage.bucket(req.bucket)
