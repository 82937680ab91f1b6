"""The OSS-protocol test server, driven by oss2's own code: signatures, listings, objects, multipart, and the server
as a process. OssArchive's behaviour under faults is in test_ossserver_archive.py."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import oss2
import pytest

from cachemgr.archive.oss import crc64_file
from ossserver import OssServer

from .support import OSS_AK as AK
from .support import OSS_SK as SK
from .support import OSS_TOKEN as TOKEN
from .support import random_file

# -- signatures


def test_requests_signed_with_the_right_keys_are_accepted(bucket):
    bucket.put_object("hello.txt", b"hello")
    assert bucket.get_object("hello.txt").read() == b"hello"


def test_the_server_signs_the_subresources_oss2_signs():
    from ossserver.signing import SUBRESOURCES

    assert SUBRESOURCES == oss2.auth.ProviderAuth._subresource_key_set


def test_a_wrong_secret_is_refused_with_signature_does_not_match(server, bucket_name):
    bad = oss2.Bucket(oss2.Auth(AK, "not-the-secret"), server.endpoint, bucket_name)
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch) as info:
        bad.put_object("x", b"x")
    assert info.value.status == 403
    assert info.value.request_id
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):  # a large body still gets the error, not a reset
        bad.put_object("big", os.urandom(4 << 20))


def test_an_unknown_key_id_is_refused(server, bucket_name):
    bad = oss2.Bucket(oss2.Auth("LTAI-nobody", SK), server.endpoint, bucket_name)
    with pytest.raises(oss2.exceptions.ServerError) as info:
        bad.list_objects_v2()
    assert (info.value.status, info.value.code) == (403, "InvalidAccessKeyId")


def test_a_head_request_error_still_carries_its_code(server, bucket_name):
    """HEAD has no body: OSS puts the error XML, base64-encoded, in `x-oss-err`, and oss2 reads it there."""
    bad = oss2.Bucket(oss2.Auth(AK, "wrong"), server.endpoint, bucket_name)
    with pytest.raises(oss2.exceptions.ServerError) as info:
        bad.head_object("anything")
    assert info.value.code == "SignatureDoesNotMatch"


def test_anonymous_requests_are_refused_when_keys_are_configured(server, bucket_name):
    anonymous = oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, bucket_name)
    with pytest.raises(oss2.exceptions.AccessDenied):
        anonymous.list_objects()


def test_sts_tokens_are_checked_when_configured(tmp_path):
    with OssServer(tmp_path, access_key_id="STS.tmp", access_key_secret=SK, security_token=TOKEN) as srv:
        srv.create_bucket("sts-bucket")
        good = oss2.Bucket(oss2.StsAuth("STS.tmp", SK, TOKEN), srv.endpoint, "sts-bucket")
        good.put_object("a", b"a")
        wrong = oss2.Bucket(oss2.StsAuth("STS.tmp", SK, "stolen"), srv.endpoint, "sts-bucket")
        with pytest.raises(oss2.exceptions.ServerError) as info:
            wrong.get_object("a")
        assert (info.value.status, info.value.code) == (403, "InvalidSecurityToken")


def test_presigned_urls_work_until_they_expire(bucket):
    bucket.put_object("dir/file name.bin", b"presigned")
    with urllib.request.urlopen(bucket.sign_url("GET", "dir/file name.bin", 60)) as response:
        assert response.read() == b"presigned"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bucket.sign_url("GET", "dir/file name.bin", -10))
    assert info.value.code == 403


def test_service_lists_buckets(server, bucket_name):
    service = oss2.Service(oss2.Auth(AK, SK), server.endpoint)
    assert bucket_name in [b.name for b in oss2.BucketIterator(service)]


def test_errors_carry_the_oss_error_document(server, bucket):
    with pytest.raises(oss2.exceptions.NoSuchKey) as info:
        bucket.get_object("missing/key")
    error = info.value
    assert error.status == 404
    assert set(error.details) >= {"Code", "Message", "RequestId", "HostId"}
    assert error.details["RequestId"] == error.request_id
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, "no-such-bucket").get_object("k")


# -- listings


def test_list_objects_v2_pages_with_continuation_tokens(bucket):
    keys = sorted(f"models/m/{i:02d}.json" for i in range(23))
    for key in keys:
        bucket.put_object(key, b"{}")

    pages, token = [], ""
    while True:
        result = bucket.list_objects_v2(prefix="models/", continuation_token=token, max_keys=7)
        pages.append([o.key for o in result.object_list])
        if not result.is_truncated:
            break
        token = result.next_continuation_token

    assert [len(p) for p in pages] == [7, 7, 7, 2]
    assert [k for p in pages for k in p] == keys
    assert [o.key for o in oss2.ObjectIteratorV2(bucket, prefix="models/", max_keys=5)] == keys


def test_delimiter_rolls_keys_up_into_common_prefixes_across_pages(bucket):
    for model in ("alpha", "beta", "gamma"):
        for component in ("base", "lora"):
            bucket.put_object(f"l3/{model}/{component}/v1/manifest.json", b"{}")
    bucket.put_object("l3/README.txt", b"hi")

    result = bucket.list_objects_v2(prefix="l3/", delimiter="/")
    assert result.prefix_list == ["l3/alpha/", "l3/beta/", "l3/gamma/"]
    assert [o.key for o in result.object_list] == ["l3/README.txt"]

    paged = list(oss2.ObjectIteratorV2(bucket, prefix="l3/", delimiter="/", max_keys=1))
    assert [o.key for o in paged] == ["l3/README.txt", "l3/alpha/", "l3/beta/", "l3/gamma/"]
    v1 = list(oss2.ObjectIterator(bucket, prefix="l3/alpha/", delimiter="/", max_keys=1))
    assert [o.key for o in v1] == ["l3/alpha/base/", "l3/alpha/lora/"]


def test_keys_with_spaces_and_unicode_round_trip_through_url_encoding(bucket):
    key = "models/été/a b+c%d.json"
    bucket.put_object(key, b"x")
    assert [o.key for o in bucket.list_objects_v2(prefix="models/").object_list] == [key]
    assert bucket.get_object(key).read() == b"x"


# -- objects


def test_ranged_get_answers_206_with_content_range(bucket):
    data = bytes(range(256)) * 40
    bucket.put_object("blob", data)

    result = bucket.get_object("blob", byte_range=(100, 199))
    assert (result.status, result.content_range) == (206, f"bytes 100-199/{len(data)}")
    assert result.read() == data[100:200]
    assert bucket.get_object("blob", byte_range=(None, 10)).read() == data[-10:]
    assert bucket.get_object("blob", byte_range=(len(data) - 3, None)).read() == data[-3:]


def test_an_unsatisfiable_range_is_ignored_unless_standard_behaviour_is_asked(bucket):
    """OSS's quirk: by default a bad range returns the whole object with 200."""
    bucket.put_object("small", b"0123456789")
    assert bucket.get_object("small", byte_range=(50, 60)).read() == b"0123456789"
    with pytest.raises(oss2.exceptions.ServerError) as info:
        bucket.get_object("small", byte_range=(50, 60), headers={"x-oss-range-behavior": "standard"})
    assert info.value.status == 416


def test_put_answers_the_etag_and_crc64_oss2_checks(bucket, tmp_path):
    path = random_file(tmp_path / "data.bin", 300_000)

    result = bucket.put_object_from_file("data.bin", str(path))

    assert result.etag == hashlib.md5(path.read_bytes()).hexdigest().upper()
    assert str(result.crc) == crc64_file(path)
    head = bucket.head_object("data.bin")
    assert str(head.server_crc) == crc64_file(path)
    assert head.content_length == 300_000


def test_a_wrong_content_md5_is_refused(bucket):
    with pytest.raises(oss2.exceptions.InvalidDigest):
        bucket.put_object("x", b"payload", headers={"Content-MD5": base64.b64encode(b"0" * 16).decode()})


def test_resumable_upload_takes_the_multipart_path(bucket, tmp_path):
    path = random_file(tmp_path / "big.bin", 350 * 1024)

    result = oss2.resumable_upload(
        bucket, "big.bin", str(path), store=oss2.ResumableStore(root=str(tmp_path)),
        multipart_threshold=100 * 1024, part_size=100 * 1024, num_threads=2,
    )

    assert result.etag.endswith("-4")
    assert bucket.get_object("big.bin").read() == path.read_bytes()
    assert bucket.head_object("big.bin").object_type == "Multipart"
    assert str(bucket.head_object("big.bin").server_crc) == crc64_file(path)


def test_multipart_parts_can_be_listed_and_the_upload_aborted(bucket):
    upload_id = bucket.init_multipart_upload("parts.bin").upload_id
    bucket.upload_part("parts.bin", upload_id, 1, b"a" * 200_000)
    bucket.upload_part("parts.bin", upload_id, 2, b"b" * 10)

    parts = list(oss2.PartIterator(bucket, "parts.bin", upload_id))
    assert [(p.part_number, p.size) for p in parts] == [(1, 200_000), (2, 10)]

    bucket.abort_multipart_upload("parts.bin", upload_id)
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.list_parts("parts.bin", upload_id)


def test_concurrent_completions_of_one_upload_both_answer_with_the_object(bucket):
    """A client that gave up waiting on a slow join retries CompleteMultipartUpload while the first is still
    running: both get the object (not a 500 from parts the first one removed), and the object is whole."""
    from concurrent.futures import ThreadPoolExecutor

    upload_id = bucket.init_multipart_upload("twice.bin").upload_id
    chunks = [os.urandom(200_000) for _ in range(6)]
    parts = [oss2.models.PartInfo(n, bucket.upload_part("twice.bin", upload_id, n, data).etag)
             for n, data in enumerate(chunks, start=1)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: bucket.complete_multipart_upload("twice.bin", upload_id, parts), range(4)))
    assert {r.status for r in results} == {200} and len({r.etag for r in results}) == 1
    assert bucket.get_object("twice.bin").read() == b"".join(chunks)
    with pytest.raises(oss2.exceptions.NoSuchUpload):  # completed: no parts are left to list
        bucket.list_parts("twice.bin", upload_id)


def test_multipart_refuses_parts_smaller_than_100_kib_and_unknown_etags(bucket):
    upload_id = bucket.init_multipart_upload("tiny.bin").upload_id
    first = bucket.upload_part("tiny.bin", upload_id, 1, b"a" * 1000)
    second = bucket.upload_part("tiny.bin", upload_id, 2, b"b" * 10)
    with pytest.raises(oss2.exceptions.ServerError) as info:
        bucket.complete_multipart_upload(
            "tiny.bin", upload_id, [oss2.models.PartInfo(1, first.etag), oss2.models.PartInfo(2, second.etag)]
        )
    assert info.value.code == "EntityTooSmall"
    with pytest.raises(oss2.exceptions.ServerError) as info:
        bucket.complete_multipart_upload("tiny.bin", upload_id, [oss2.models.PartInfo(1, "0" * 32)])
    assert info.value.code == "InvalidPart"


def test_copy_object_copies_the_bytes(server, bucket_name, bucket):
    data = os.urandom(150_000)
    bucket.put_object("src/model.safetensors", data)

    bucket.copy_object(bucket_name, "src/model.safetensors", "dst/model.safetensors")
    server.corrupt(bucket_name, "src/model.safetensors")

    copied = bucket.get_object("dst/model.safetensors").read()
    assert copied == data  # a real copy: corrupting the source afterwards does not touch it
    assert bucket.head_object("dst/model.safetensors").content_length == len(data)


def test_batch_delete_removes_the_keys_it_reports(bucket):
    for key in ("a/1", "a/2", "a/3"):
        bucket.put_object(key, b"x")

    result = bucket.batch_delete_objects(["a/1", "a/3", "a/never-existed"])

    assert sorted(result.deleted_keys) == ["a/1", "a/3", "a/never-existed"]
    assert [o.key for o in bucket.list_objects_v2(prefix="a/").object_list] == ["a/2"]


# -- as a process


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_the_server_runs_as_a_process_and_prints_its_endpoint(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "ossserver", "--root", str(tmp_path), "--bucket", "proc-bucket",
         "--access-key-id", AK, "--access-key-secret", SK],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        endpoint = process.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        bucket = oss2.Bucket(oss2.Auth(AK, SK), endpoint, "proc-bucket")
        bucket.put_object("k", b"v")
        assert bucket.get_object("k").read() == b"v"
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_objects_survive_a_restart(tmp_path):
    with OssServer(tmp_path) as first:
        first.create_bucket("keep-me")
        oss2.Bucket(oss2.AnonymousAuth(), first.endpoint, "keep-me").put_object("a/b", b"persisted")
    with OssServer(tmp_path) as second:
        bucket = oss2.Bucket(oss2.AnonymousAuth(), second.endpoint, "keep-me")
        assert bucket.get_object("a/b").read() == b"persisted"
        assert [o.key for o in bucket.list_objects_v2().object_list] == ["a/b"]


def test_last_modified_is_written_as_oss_writes_it(bucket):
    before = int(time.time())
    bucket.put_object("dated", b"x")
    listed = bucket.list_objects_v2(prefix="dated").object_list[0]
    assert before - 1 <= listed.last_modified <= int(time.time()) + 1
    assert abs(bucket.head_object("dated").last_modified - listed.last_modified) <= 1
