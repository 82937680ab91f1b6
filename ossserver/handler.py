"""One HTTP request against the OSS REST dialect: parse, authenticate, route, answer.

Bodies stream between the socket and disk in 1 MiB chunks (GETs use sendfile), so object size is bounded by
the disk, not by memory.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import xmlbody
from .errors import OssError
from .link import CHUNK as LINK_CHUNK
from .signing import check_request
from .storage import BucketStore, Digest, ObjectMeta

if TYPE_CHECKING:
    from .server import OssServer

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_XML_BODY = 4 << 20
MAX_KEY_BYTES = 1023
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


@dataclass
class Request:
    method: str
    bucket: str | None
    key: str
    params: dict[str, str]


def _token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode()


def _untoken(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise OssError("InvalidArgument", "The continuation token is not valid.") from None


def _int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name) or ""
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise OssError("InvalidArgument", f"{name} must be an integer between {low} and {high}.",
                       ArgumentName=name, ArgumentValue=raw)
    return int(raw)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a satisfiable single `bytes=` range, or None when absent or unusable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or start > end:
        return None
    return start, min(end, size - 1)


class OssHandler(BaseHTTPRequestHandler):
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

    # -- service and buckets
    def _list_buckets(self, req: Request) -> None:
        max_keys = _int_param(req.params, "max-keys", 100, 1, 1000)
        body = xmlbody.list_buckets(
            self.oss.storage.list_buckets(), self._host, req.params.get("prefix", ""),
            req.params.get("marker", ""), max_keys,
        )
        self._send(200, body=body)

    def _create_bucket(self, req: Request) -> None:
        config = self._read_body()
        if config:
            xmlbody.parse(config, "CreateBucketConfiguration")
        self.oss.storage.create_bucket(req.bucket or "")
        self._send(200, {"Location": f"/{req.bucket}"})

    def _delete_bucket(self, req: Request) -> None:
        self.oss.storage.delete_bucket(req.bucket or "")
        self._send(204)

    def _list_objects(self, req: Request, v2: bool) -> None:
        p = req.params
        bucket = self._bucket(req)
        prefix, delimiter = p.get("prefix", ""), p.get("delimiter", "")
        max_keys = _int_param(p, "max-keys", 100, 0, 1000)
        url_encoding = p.get("encoding-type") == "url"
        if v2:
            token, start_after = p.get("continuation-token", ""), p.get("start-after", "")
            after = _untoken(token) if token else start_after
            page = bucket.list(prefix, delimiter, after, max_keys)
            body = xmlbody.list_objects_v2(
                bucket.name, page, prefix, delimiter, start_after, token, _token(page.next_after), max_keys,
                url_encoding, p.get("fetch-owner") == "true",
            )
        else:
            marker = p.get("marker", "")
            page = bucket.list(prefix, delimiter, marker, max_keys)
            body = xmlbody.list_objects(bucket.name, page, prefix, delimiter, marker, max_keys, url_encoding)
        self._send(200, body=body)

    def _batch_delete(self, req: Request) -> None:
        bucket = self._bucket(req)
        body = self._read_body()
        expected = self.headers.get("Content-MD5")
        if not expected:
            raise OssError("InvalidRequest", "Missing required header for this request: Content-MD5.")
        if base64.b64encode(hashlib.md5(body).digest()).decode() != expected:
            raise OssError("InvalidDigest", ContentMD5=expected)
        root = xmlbody.parse(body, "Delete")
        keys = [node.findtext("Key") or "" for node in root.findall("Object")]
        if not keys or len(keys) > 1000 or any(not k for k in keys):
            raise OssError("MalformedXML", "A Delete request names 1 to 1000 non-empty keys.")
        for key in keys:
            bucket.delete(key)
        quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
        self._send(200, body=xmlbody.delete_result([] if quiet else keys, req.params.get("encoding-type") == "url"))

    # -- objects
    def _user_meta(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-oss-meta-")}

    def _content_type(self) -> str:
        return self.headers.get("Content-Type") or "application/octet-stream"

    def _put_object(self, req: Request) -> None:
        bucket = self._bucket(req)
        tmp, digest = self._receive(bucket)
        forbid = self.headers.get("x-oss-forbid-overwrite", "").lower() == "true"
        try:
            meta = bucket.commit(req.key, tmp, digest, self._content_type(), self._user_meta(), forbid_overwrite=forbid)
        finally:
            tmp.unlink(missing_ok=True)
        self._send(200, {"ETag": f'"{meta.etag}"', "x-oss-hash-crc64ecma": meta.crc64, "Content-MD5": digest.content_md5})

    def _copy_source(self) -> tuple[BucketStore, str]:
        raw = self.headers.get("x-oss-copy-source", "").split("?", 1)[0].lstrip("/")
        src_bucket, _, src_key = raw.partition("/")
        if not src_bucket or not src_key:
            raise OssError("InvalidArgument", "x-oss-copy-source must be /bucket/key.")
        return self.oss.storage.bucket(unquote(src_bucket)), unquote(src_key)

    def _copy_object(self, req: Request) -> None:
        bucket = self._bucket(req)
        self._read_body()
        source, src_key = self._copy_source()
        replace = None
        if self.headers.get("x-oss-metadata-directive", "COPY").upper() == "REPLACE":
            replace = {"content_type": self.headers.get("Content-Type"), "user_meta": self._user_meta()}
        meta = bucket.copy_from(source, src_key, req.key, replace)
        self._send(200, {"ETag": f'"{meta.etag}"', "x-oss-hash-crc64ecma": meta.crc64},
                   xmlbody.copy_result("CopyObjectResult", meta))

    def _object_headers(self, meta: ObjectMeta, params: dict[str, str], whole: bool) -> dict[str, str]:
        headers = {
            "Content-Type": meta.content_type,
            "ETag": f'"{meta.etag}"',
            "Last-Modified": formatdate(meta.last_modified, usegmt=True),
            "Accept-Ranges": "bytes",
            "x-oss-object-type": meta.object_type,
            "x-oss-storage-class": "Standard",
            "x-oss-hash-crc64ecma": meta.crc64,
        }
        if whole and meta.content_md5:
            headers["Content-MD5"] = meta.content_md5
        headers.update(meta.user_meta)
        for param, header in RESPONSE_OVERRIDES.items():
            if params.get(param):
                headers[header] = params[param]
        return headers

    def _not_modified(self, meta: ObjectMeta) -> bool:
        """Apply If-Match / If-None-Match / If-(Un)Modified-Since; True means answer 304."""
        etag = f'"{meta.etag}"'
        if_match = self.headers.get("If-Match")
        if if_match and if_match.strip() not in (etag, meta.etag, "*"):
            raise OssError("PreconditionFailed", Condition="If-Match")
        since = self.headers.get("If-Unmodified-Since")
        if since and meta.last_modified > parsedate_to_datetime(since).timestamp():
            raise OssError("PreconditionFailed", Condition="If-Unmodified-Since")
        if_none = self.headers.get("If-None-Match")
        if if_none:
            return if_none.strip() in (etag, meta.etag, "*")
        since = self.headers.get("If-Modified-Since")
        return bool(since) and meta.last_modified <= parsedate_to_datetime(since).timestamp()

    def _get_object(self, req: Request) -> None:
        bucket = self._bucket(req)
        meta, fh = bucket.open(req.key)
        with fh:
            if self._not_modified(meta):
                return self._send(304, {"ETag": f'"{meta.etag}"'})
            size = meta.size
            wanted = parse_range(self.headers.get("Range"), size) if req.method == "GET" else None
            if wanted is None and self.headers.get("Range") and req.method == "GET":
                if self.headers.get("x-oss-range-behavior", "").lower() == "standard":
                    raise OssError("InvalidRange", ActualObjectSize=str(size), RangeRequested=self.headers["Range"])
            headers = self._object_headers(meta, req.params, whole=wanted is None)
            start, end = wanted if wanted else (0, size - 1)
            length = end - start + 1 if size else 0
            headers["Content-Length"] = str(length)
            if wanted:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(206 if wanted else 200, headers, content_type=None)
            if req.method == "GET" and length:
                self._send_file(fh, start, length, req)

    def _send_file(self, fh, start: int, length: int, req: Request) -> None:
        cut = self.oss._cut_at(req.bucket or "", req.key, start, length)
        count = length if cut is None else max(0, cut - start)
        sent = 0
        link = self.oss.link.down
        while sent < count:
            if link.rate:
                link.take(min(LINK_CHUNK, count - sent))
                n = self.connection.sendfile(fh, start + sent, min(LINK_CHUNK, count - sent))
            else:
                n = self.connection.sendfile(fh, start + sent, count - sent)
            if not n:
                break
            sent += n
        if cut is not None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- multipart
    def _initiate(self, req: Request) -> None:
        bucket = self._bucket(req)
        self._read_body()
        upload_id = bucket.initiate(req.key, self._content_type(), self._user_meta())
        self._send(200, body=xmlbody.initiate_result(bucket.name, req.key, upload_id))

    def _part_number(self, req: Request) -> int:
        raw = req.params.get("partNumber", "")
        if not raw.isdigit():
            raise OssError("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive.")
        return int(raw)

    def _upload_part(self, req: Request) -> None:
        bucket = self._bucket(req)
        number = self._part_number(req)
        upload_id = req.params["uploadId"]
        bucket.parts(upload_id, req.key)  # NoSuchUpload before the body is read
        if self.headers.get("x-oss-copy-source"):
            self._read_body()
            source, src_key = self._copy_source()
            meta, fh = source.open(src_key)
            span = parse_range(self.headers.get("x-oss-copy-source-range"), meta.size) or (0, meta.size - 1)
            tmp, digest = bucket.new_temp(), Digest()
            with fh, open(tmp, "wb") as out:
                fh.seek(span[0])
                remaining = span[1] - span[0] + 1
                while remaining > 0 and (chunk := fh.read(min(CHUNK, remaining))):
                    digest.update(chunk)
                    out.write(chunk)
                    remaining -= len(chunk)
            part = bucket.put_part(upload_id, req.key, number, tmp, digest)
            return self._send(200, {"ETag": f'"{part.etag}"'}, xmlbody.copy_part_result(part))
        tmp, digest = self._receive(bucket)
        part = bucket.put_part(upload_id, req.key, number, tmp, digest)
        self._send(200, {"ETag": f'"{part.etag}"', "x-oss-hash-crc64ecma": part.crc64,
                         "Content-MD5": digest.content_md5})

    def _complete(self, req: Request) -> None:
        bucket = self._bucket(req)
        upload_id = req.params["uploadId"]
        body = self._read_body()
        if self.headers.get("x-oss-complete-all", "").lower() == "yes":
            requested = [(p.number, p.etag) for p in bucket.parts(upload_id, req.key)]
        else:
            root = xmlbody.parse(body, "CompleteMultipartUpload")
            try:
                requested = [(int(n.findtext("PartNumber") or ""), n.findtext("ETag") or "") for n in root.findall("Part")]
            except ValueError:
                raise OssError("MalformedXML", "PartNumber must be an integer.") from None
        meta = bucket.complete(upload_id, req.key, requested)
        location = f"http://{self._host}/{bucket.name}/{req.key}"
        body = xmlbody.complete_result(location, bucket.name, meta, req.params.get("encoding-type") == "url")
        self._send(200, {"ETag": f'"{meta.etag}"', "x-oss-hash-crc64ecma": meta.crc64}, body)

    def _list_parts(self, req: Request) -> None:
        bucket = self._bucket(req)
        upload_id = req.params["uploadId"]
        parts = bucket.parts(upload_id, req.key)
        marker = _int_param(req.params, "part-number-marker", 0, 0, 10000)
        max_parts = _int_param(req.params, "max-parts", 1000, 1, 1000)
        self._send(200, body=xmlbody.list_parts(bucket.name, req.key, upload_id, parts, marker, max_parts))

    def _list_uploads(self, req: Request) -> None:
        bucket = self._bucket(req)
        body = xmlbody.list_uploads(bucket.name, bucket.uploads(), req.params.get("prefix", ""),
                                    req.params.get("encoding-type") == "url")
        self._send(200, body=body)
