"""OssArchive against the project's OSS server under faults: corrupted objects, interrupted downloads resumed from
their checkpoint, dropped connections, server errors, wrong credentials, missing buckets and files."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr.archive import ArchiveUnavailable, VersionNotFound, open_archive
from cachemgr.archive.oss import OssArchive, crc64_file
from ossserver import OssServer

from .support import OSS_REF as REF
from .support import make_archive


@pytest.fixture
def published(server, bucket_name, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    weights = np.frombuffer(os.urandom(1_500_000), dtype=np.uint8).reshape(1500, 1000)
    save_file({"unet.weight": weights}, str(source / "model.safetensors"))
    (source / "config.json").write_text('{"sample_size": 8}')
    archive = make_archive(server, bucket_name, tmp_path)
    manifest = archive.publish(REF, source)
    yield archive, manifest, source
    archive.close()


def test_stat_exposes_the_crc64_that_crc64_file_computes(published):
    archive, _, source = published
    info = archive.stat(REF, "model.safetensors")
    assert info.crc64 == crc64_file(source / "model.safetensors")
    assert info.etag and info.etag.endswith("-12")


def test_a_corrupted_object_downloads_but_fails_the_manifest_sha256(server, bucket_name, published, tmp_path):
    """OSS's own CRC does not catch bit rot on a ranged read: the sha256 in the manifest does."""
    archive, manifest, _ = published
    server.corrupt(bucket_name, "l3/nano-banana/base/v1.0.0/model.safetensors", offset=700_000)

    target = tmp_path / "downloaded.safetensors"
    with open(target, "wb") as fh:
        archive.download(REF, "model.safetensors", fh)

    assert target.stat().st_size == manifest.file("model.safetensors").size
    assert hashlib.sha256(target.read_bytes()).hexdigest() != manifest.file("model.safetensors").sha256
    assert crc64_file(target) != archive.stat(REF, "model.safetensors").crc64


def _ranges_requested(server: OssServer, since: int, key: str) -> list[tuple[int, int]]:
    spans = []
    for record in server.requests[since:]:
        if record.method == "GET" and record.key == key and record.range:
            first, last = record.range.removeprefix("bytes=").split("-")
            spans.append((int(first), int(last)))
    return spans


def test_an_interrupted_download_resumes_from_its_checkpoint(server, bucket_name, published, tmp_path):
    archive, manifest, source = published
    key = "l3/nano-banana/base/v1.0.0/model.safetensors"
    size = manifest.file("model.safetensors").size
    server.drop_after(bucket_name, key, offset=700_000)
    target = tmp_path / "partial.safetensors"

    with open(target, "wb") as fh, pytest.raises(ArchiveUnavailable, match="resumes"):
        archive.download(REF, "model.safetensors", fh)
    assert list((tmp_path / "ckpt").glob("*.download.json"))

    server.clear_faults()
    mark = len(server.requests)
    with open(target, "r+b") as fh:
        archive.download(REF, "model.safetensors", fh)

    assert target.read_bytes() == (source / "model.safetensors").read_bytes()
    spans = _ranges_requested(server, mark, key)
    assert spans and min(first for first, _ in spans) >= 128 * 1024  # the first part was not fetched again
    assert sum(last - first + 1 for first, last in spans) < size
    assert not list((tmp_path / "ckpt").glob("*.download.json"))


def test_a_dropped_connection_is_resumed_within_the_same_call(server, bucket_name, published, tmp_path):
    archive, _, source = published
    key = "l3/nano-banana/base/v1.0.0/model.safetensors"
    server.drop_after(bucket_name, key, offset=300_000, times=1)
    target = tmp_path / "once.safetensors"

    with open(target, "wb") as fh:
        archive.download(REF, "model.safetensors", fh)

    assert target.read_bytes() == (source / "model.safetensors").read_bytes()


def test_iterating_a_file_survives_a_dropped_connection(server, bucket_name, published):
    archive, _, source = published
    server.drop_after(bucket_name, "l3/nano-banana/base/v1.0.0/model.safetensors", offset=1_000_000, times=2)

    data = b"".join(archive.iter_file(REF, "model.safetensors", chunk_size=64 * 1024))

    assert data == (source / "model.safetensors").read_bytes()


def test_server_errors_are_retried(server, bucket_name, published):
    archive, _, _ = published
    server.fail_next(2)
    assert archive.list_versions("nano-banana", "base") == ["v1.0.0"]


def test_persistent_server_errors_end_in_a_clear_message(server, bucket_name, tmp_path):
    archive = make_archive(server, bucket_name, tmp_path, retries=1)
    server.fail_next(5)
    with pytest.raises(ArchiveUnavailable, match="kept failing .*503"):
        archive.list_models()


def test_wrong_credentials_name_the_settings_to_check(server, bucket_name, tmp_path):
    archive = make_archive(server, bucket_name, tmp_path, access_key_secret="wrong")
    with pytest.raises(ArchiveUnavailable, match=f"refused the credentials for bucket {bucket_name}.*FLEET_OSS_ACCESS_KEY_SECRET"):
        archive.list_models()


def test_a_missing_bucket_is_named(server, tmp_path):
    archive = make_archive(server, "no-such-bucket", tmp_path)
    with pytest.raises(ArchiveUnavailable, match="bucket no-such-bucket at .* does not exist"):
        archive.list_versions("nano-banana", "base")


def test_an_unreachable_endpoint_says_so(tmp_path):
    archive = open_archive("oss://models/l3", endpoint="http://127.0.0.1:9", retries=1, retry_backoff=0.01)
    with pytest.raises(ArchiveUnavailable, match="cannot reach OSS endpoint http://127.0.0.1:9"):
        archive.list_models()


def test_a_missing_file_is_version_not_found(published):
    archive, _, _ = published
    with pytest.raises(VersionNotFound, match="nano-banana/base/v1.0.0/nope.json"):
        archive.read_range(REF, "nope.json", 0, 10)


def test_path_style_is_chosen_for_ip_endpoints():
    assert OssArchive("models", endpoint="http://127.0.0.1:1")._bucket._make_url("models", "k") == "http://127.0.0.1:1/models/k"
    virtual = OssArchive("models", endpoint="https://oss-cn-hangzhou.aliyuncs.com")
    assert virtual._bucket._make_url("models", "k") == "https://models.oss-cn-hangzhou.aliyuncs.com/k"
    forced = OssArchive("models", endpoint="http://minio.internal:9000", is_path_style=True)
    assert forced._bucket._make_url("models", "k") == "http://minio.internal:9000/models/k"
