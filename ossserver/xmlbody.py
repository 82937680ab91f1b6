"""The XML documents the OSS REST API answers with, built the way oss2's parsers read them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from urllib.parse import quote

from .errors import OssError
from .storage import BucketStore, ListPage, ObjectMeta, PartMeta, iso8601

OWNER_ID = "1000000000000000"
OWNER_NAME = "warmfleet"
REGION = "oss-cn-hangzhou"


def _doc(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _add(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
    node = ET.SubElement(parent, tag)
    if text is not None:
        node.text = str(text)
    return node


def encoder(url_encoding: bool):
    """With `encoding-type=url`, keys and prefixes are percent-encoded (oss2 decodes them with `unquote`)."""
    return (lambda s: quote(s, safe="/")) if url_encoding else (lambda s: s)


def error(code: str, message: str, request_id: str, host_id: str, extra: dict[str, str]) -> bytes:
    root = ET.Element("Error")
    _add(root, "Code", code)
    _add(root, "Message", message)
    _add(root, "RequestId", request_id)
    _add(root, "HostId", host_id)
    for k, v in extra.items():
        _add(root, k, v)
    return _doc(root)


def _owner(parent: ET.Element) -> None:
    owner = _add(parent, "Owner")
    _add(owner, "ID", OWNER_ID)
    _add(owner, "DisplayName", OWNER_NAME)


def list_buckets(buckets: list[BucketStore], host: str, prefix: str, marker: str, max_keys: int) -> bytes:
    chosen = [b for b in buckets if b.name.startswith(prefix) and b.name > marker]
    page, truncated = chosen[:max_keys], len(chosen) > max_keys
    root = ET.Element("ListAllMyBucketsResult")
    if prefix:
        _add(root, "Prefix", prefix)
    if marker:
        _add(root, "Marker", marker)
    if truncated:
        _add(root, "MaxKeys", max_keys)
        _add(root, "IsTruncated", "true")
        _add(root, "NextMarker", page[-1].name)
    _owner(root)
    node = _add(root, "Buckets")
    for b in page:
        item = _add(node, "Bucket")
        _add(item, "CreationDate", iso8601(b.created))
        _add(item, "ExtranetEndpoint", host)
        _add(item, "IntranetEndpoint", host)
        _add(item, "Location", REGION)
        _add(item, "Name", b.name)
        _add(item, "Region", REGION.removeprefix("oss-"))
        _add(item, "StorageClass", "Standard")
    return _doc(root)


def _contents(root: ET.Element, page: ListPage, enc, owner: bool) -> None:
    for meta in page.contents:
        item = _add(root, "Contents")
        _add(item, "Key", enc(meta.key))
        _add(item, "LastModified", iso8601(meta.last_modified))
        _add(item, "ETag", f'"{meta.etag}"')
        _add(item, "Type", meta.object_type)
        _add(item, "Size", meta.size)
        _add(item, "StorageClass", "Standard")
        if owner:
            _owner(item)
    for common in page.prefixes:
        _add(_add(root, "CommonPrefixes"), "Prefix", enc(common))


def list_objects(bucket: str, page: ListPage, prefix: str, delimiter: str, marker: str, max_keys: int,
                 url_encoding: bool) -> bytes:
    enc = encoder(url_encoding)
    root = ET.Element("ListBucketResult")
    _add(root, "Name", bucket)
    _add(root, "Prefix", enc(prefix))
    _add(root, "Marker", enc(marker))
    _add(root, "MaxKeys", max_keys)
    _add(root, "Delimiter", enc(delimiter))
    if url_encoding:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", "true" if page.truncated else "false")
    if page.truncated:
        _add(root, "NextMarker", enc(page.next_after))
    _contents(root, page, enc, owner=True)
    return _doc(root)


def list_objects_v2(bucket: str, page: ListPage, prefix: str, delimiter: str, start_after: str, token: str,
                    next_token: str, max_keys: int, url_encoding: bool, fetch_owner: bool) -> bytes:
    enc = encoder(url_encoding)
    root = ET.Element("ListBucketResult")
    _add(root, "Name", bucket)
    _add(root, "Prefix", enc(prefix))
    if start_after:
        _add(root, "StartAfter", enc(start_after))
    if token:
        _add(root, "ContinuationToken", token)
    _add(root, "MaxKeys", max_keys)
    _add(root, "Delimiter", enc(delimiter))
    if url_encoding:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", "true" if page.truncated else "false")
    if page.truncated:
        _add(root, "NextContinuationToken", next_token)
    _add(root, "KeyCount", len(page.contents) + len(page.prefixes))
    _contents(root, page, enc, owner=fetch_owner)
    return _doc(root)


def copy_result(tag: str, meta: ObjectMeta) -> bytes:
    root = ET.Element(tag)
    _add(root, "LastModified", iso8601(meta.last_modified))
    _add(root, "ETag", f'"{meta.etag}"')
    return _doc(root)


def copy_part_result(part: PartMeta) -> bytes:
    root = ET.Element("CopyPartResult")
    _add(root, "LastModified", iso8601(part.last_modified))
    _add(root, "ETag", f'"{part.etag}"')
    return _doc(root)


def initiate_result(bucket: str, key: str, upload_id: str) -> bytes:
    root = ET.Element("InitiateMultipartUploadResult")
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "UploadId", upload_id)
    return _doc(root)


def complete_result(location: str, bucket: str, meta: ObjectMeta, url_encoding: bool) -> bytes:
    enc = encoder(url_encoding)
    root = ET.Element("CompleteMultipartUploadResult")
    if url_encoding:
        _add(root, "EncodingType", "url")
    _add(root, "Location", location)
    _add(root, "Bucket", bucket)
    _add(root, "Key", enc(meta.key))
    _add(root, "ETag", f'"{meta.etag}"')
    return _doc(root)


def list_parts(bucket: str, key: str, upload_id: str, parts: list[PartMeta], marker: int, max_parts: int) -> bytes:
    chosen = [p for p in parts if p.number > marker]
    page, truncated = chosen[:max_parts], len(chosen) > max_parts
    root = ET.Element("ListPartsResult")
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "UploadId", upload_id)
    _add(root, "PartNumberMarker", marker)
    _add(root, "NextPartNumberMarker", page[-1].number if page else marker)
    _add(root, "MaxParts", max_parts)
    _add(root, "IsTruncated", "true" if truncated else "false")
    for p in page:
        item = _add(root, "Part")
        _add(item, "PartNumber", p.number)
        _add(item, "LastModified", iso8601(p.last_modified))
        _add(item, "ETag", f'"{p.etag}"')
        _add(item, "HashCrc64ecma", p.crc64)
        _add(item, "Size", p.size)
    return _doc(root)


def list_uploads(bucket: str, uploads: list[tuple[str, str, int]], prefix: str, url_encoding: bool) -> bytes:
    enc = encoder(url_encoding)
    root = ET.Element("ListMultipartUploadsResult")
    _add(root, "Bucket", bucket)
    if url_encoding:
        _add(root, "EncodingType", "url")
    _add(root, "KeyMarker", "")
    _add(root, "UploadIdMarker", "")
    _add(root, "NextKeyMarker", "")
    _add(root, "NextUploadIdMarker", "")
    _add(root, "Delimiter", "")
    _add(root, "Prefix", enc(prefix))
    _add(root, "MaxUploads", 1000)
    _add(root, "IsTruncated", "false")
    for key, upload_id, initiated in uploads:
        if key.startswith(prefix):
            item = _add(root, "Upload")
            _add(item, "Key", enc(key))
            _add(item, "UploadId", upload_id)
            _add(item, "Initiated", iso8601(initiated))
    return _doc(root)


def delete_result(deleted: Iterable[str], url_encoding: bool) -> bytes:
    enc = encoder(url_encoding)
    root = ET.Element("DeleteResult")
    if url_encoding:
        _add(root, "EncodingType", "url")
    for key in deleted:
        _add(_add(root, "Deleted"), "Key", enc(key))
    return _doc(root)


def parse(body: bytes, root_tag: str) -> ET.Element:
    """Parse a request document, answering MalformedXML as OSS does for anything unexpected."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise OssError("MalformedXML") from None
    if root.tag != root_tag:
        raise OssError("MalformedXML", f"expected a {root_tag} document, got {root.tag}")
    return root
