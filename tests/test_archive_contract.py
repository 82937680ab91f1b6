"""One contract, every L3 archive: a local directory and OSS (oss2 against the OSS-protocol test server)."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr.archive import ArchiveError, LocalArchive, VersionNotFound, open_archive
from cachemgr.manifest import MANIFEST_NAME
from cachemgr.names import ComponentRef
from cachemgr.retention import execute, plan_retention
from ossserver import OssServer

AK, SK = "LTAI-test-key", "test-secret"
REF = ComponentRef("nano-banana", "base", "v1.0.0")


@pytest.fixture(scope="module")
def oss_server(tmp_path_factory: pytest.TempPathFactory):
    with OssServer(tmp_path_factory.mktemp("oss"), access_key_id=AK, access_key_secret=SK) as server:
        yield server


@pytest.fixture(params=["local", "oss"])
def archive(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        yield LocalArchive(tmp_path / "archive")
        return
    server: OssServer = request.getfixturevalue("oss_server")
    bucket = f"contract-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    # Small parts so that a few hundred KiB already take the multipart upload and parallel download paths.
    archive = open_archive(
        f"oss://{bucket}/l3",
        endpoint=server.endpoint,
        access_key_id=AK,
        access_key_secret=SK,
        checkpoint_dir=tmp_path / "checkpoints",
        part_size=128 * 1024,
        multipart_threshold=256 * 1024,
        threads=3,
        retry_backoff=0.01,
    )
    yield archive
    archive.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small real model version: a safetensors file of a few tensors, a config, a tokenizer file in a subfolder."""
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file(
        {
            "unet.conv_in.weight": rng.standard_normal((64, 4, 3, 3), dtype=np.float32),
            "unet.mid.weight": rng.standard_normal((256, 512), dtype=np.float32),
            "unet.mid.bias": rng.standard_normal((256,), dtype=np.float32),
        },
        str(folder / "model.safetensors"),
        metadata={"format": "np"},
    )
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 8}))
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({str(i): i for i in range(300)}))
    return folder


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_published_version_is_listed(archive, model_dir):
    archive.publish(REF, model_dir)

    assert archive.list_models() == ["nano-banana"]
    assert archive.list_components("nano-banana") == ["base"]
    assert archive.list_versions("nano-banana", "base") == ["v1.0.0"]
    assert archive.has_version(REF)


def test_versions_list_in_natural_order(archive, model_dir):
    for version in ["v1.10.0", "v1.2.0", "v1.9.1"]:
        archive.publish(ComponentRef("nano-banana", "lora", version), model_dir)

    assert archive.list_versions("nano-banana", "lora") == ["v1.2.0", "v1.9.1", "v1.10.0"]
    assert archive.latest_version("nano-banana", "lora") == "v1.10.0"
    assert archive.list_versions("nano-banana", "vae") == []


def test_manifest_round_trips(archive, model_dir):
    published = archive.publish(REF, model_dir, meta={"pipeline": "sdxl"})

    read = archive.read_manifest(REF)

    assert read == published
    assert read.meta == {"pipeline": "sdxl"}
    assert {f.path for f in read.files} == {"config.json", "model.safetensors", "tokenizer/vocab.json"}
    assert len(read.file("model.safetensors").tensors) == 3


def test_publishing_the_same_version_twice_is_refused(archive, model_dir):
    archive.publish(REF, model_dir)
    with pytest.raises(ArchiveError, match="already published"):
        archive.publish(REF, model_dir)


def test_ranged_reads_return_exactly_the_slice(archive, model_dir):
    manifest = archive.publish(REF, model_dir)
    data = (model_dir / "model.safetensors").read_bytes()

    for tensor in manifest.file("model.safetensors").tensors:
        assert sha256(archive.read_range(REF, "model.safetensors", tensor.start, tensor.end)) == tensor.sha256
    assert archive.read_range(REF, "model.safetensors", 0, 8) == data[:8]
    assert archive.read_range(REF, "model.safetensors", 1000, 1001) == data[1000:1001]
    assert archive.read_range(REF, "model.safetensors", len(data) - 5, len(data) + 100) == data[-5:]
    assert archive.read_range(REF, "model.safetensors", len(data) + 10, len(data) + 20) == b""
    assert archive.read_range(REF, "model.safetensors", 50, 50) == b""


def test_download_gives_the_file_byte_for_byte(archive, model_dir, tmp_path):
    manifest = archive.publish(REF, model_dir)
    seen = []

    for entry in manifest.files:
        target = tmp_path / "downloaded" / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            archive.download(REF, entry.path, fh, progress=seen.append)
        assert target.read_bytes() == (model_dir / entry.path).read_bytes()
        assert sha256(target.read_bytes()) == entry.sha256

    assert sum(seen) == manifest.total_size


def test_download_into_a_stream_and_iterating_give_the_same_bytes(archive, model_dir):
    archive.publish(REF, model_dir)
    expected = (model_dir / "model.safetensors").read_bytes()

    buffer = io.BytesIO()
    archive.download(REF, "model.safetensors", buffer)

    assert buffer.getvalue() == expected
    assert b"".join(archive.iter_file(REF, "model.safetensors", chunk_size=10_000)) == expected


def test_stat_reports_the_size(archive, model_dir):
    archive.publish(REF, model_dir)
    assert archive.stat(REF, "model.safetensors").size == (model_dir / "model.safetensors").stat().st_size
    with pytest.raises(VersionNotFound):
        archive.stat(REF, "missing.json")


def test_a_half_published_version_is_not_listed(archive, model_dir):
    """Files are uploaded first and the manifest last: until the manifest exists the version does not."""
    archive.publish(REF, model_dir)
    half = ComponentRef("nano-banana", "base", "v2.0.0")
    archive.put_file(half, "model.safetensors", model_dir / "model.safetensors")
    archive.put_file(half, "config.json", model_dir / "config.json")

    assert archive.list_versions("nano-banana", "base") == ["v1.0.0"]
    assert not archive.has_version(half)
    with pytest.raises(VersionNotFound):
        archive.read_manifest(half)


def test_a_missing_version_is_reported_as_such(archive):
    with pytest.raises(VersionNotFound, match="nano-banana/base/v9.9.9"):
        archive.read_manifest(ComponentRef("nano-banana", "base", "v9.9.9"))


def test_deleting_a_version_removes_it_and_its_files(archive, model_dir):
    archive.publish(REF, model_dir)
    other = ComponentRef("nano-banana", "base", "v1.1.0")
    archive.publish(other, model_dir)

    archive.delete_version(REF)

    assert archive.list_versions("nano-banana", "base") == ["v1.1.0"]
    with pytest.raises(VersionNotFound):
        archive.stat(REF, "model.safetensors")
    with pytest.raises(VersionNotFound):
        archive.delete_version(REF)
    assert archive.read_manifest(other).ref == other


def test_deleting_a_half_published_version_cleans_its_files(archive, model_dir):
    half = ComponentRef("nano-banana", "base", "v2.0.0")
    archive.put_file(half, "config.json", model_dir / "config.json")

    archive.delete_version(half)

    with pytest.raises(VersionNotFound):
        archive.stat(half, "config.json")


def test_retention_keeps_the_latest_and_the_pinned(archive, tmp_path):
    small = tmp_path / "adapter"
    small.mkdir()
    (small / "adapter_config.json").write_text('{"r": 4}')
    for version in [f"v1.{i}.0" for i in range(6)]:
        archive.publish(ComponentRef("nano-banana", "lora", version), small)
    archive.publish(ComponentRef("nano-banana", "base", "v1.0.0"), small)
    pinned = ComponentRef("nano-banana", "lora", "v1.1.0")

    plan = plan_retention(archive, keep=2, protected={pinned: "pinned"})
    deleted = execute(plan, archive)

    assert archive.list_versions("nano-banana", "lora") == ["v1.1.0", "v1.4.0", "v1.5.0"]
    assert archive.list_versions("nano-banana", "base") == ["v1.0.0"]
    assert sorted(r.version for r in deleted) == ["v1.0.0", "v1.2.0", "v1.3.0"]
    assert plan.kept[pinned] == "protected: pinned"


def test_the_manifest_is_a_plain_object_next_to_the_files(archive, model_dir):
    """The layout a human reads with `ls` or `ossutil ls`: <model>/<component>/<version>/manifest.json."""
    archive.publish(REF, model_dir)
    text = b"".join(archive.iter_file(REF, MANIFEST_NAME))
    assert json.loads(text)["version"] == "v1.0.0"
