"""The service and bucket operations of the OSS dialect: list, create and delete buckets, list objects (v1 and v2),
batch delete. Mixed into `OssHandler` (handler.py), whose plumbing (`_send`, `_bucket`, `_read_body`) they use."""

from __future__ import annotations

import base64
import hashlib

from . import xmlbody
from .errors import OssError
from .protocol import (
    Request,
    _int_param,
    _token,
    _untoken,
)


class BucketOps:
    """The service and its buckets, for `OssHandler`."""

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
