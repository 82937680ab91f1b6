"""The object operations of the OSS dialect: put, copy, head and get (ranges, conditional requests, response header
overrides), and multipart uploads. Mixed into `OssHandler` (handler.py), whose plumbing (`_send`, `_bucket`,
`_receive`, `_iter_body`) they use."""

from __future__ import annotations

import socket
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import unquote

from . import xmlbody
from .errors import OssError
from .link import CHUNK as LINK_CHUNK
from .protocol import (
    CHUNK,
    RESPONSE_OVERRIDES,
    Request,
    _int_param,
    parse_range,
)
from .storage import BucketStore, Digest, ObjectMeta


class ObjectOps:
    """Objects and multipart uploads, for `OssHandler`."""

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
