"""Manifests: sizes and hashes of every file, tensor byte ranges read from the safetensors header."""

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from cachemgr.manifest import Manifest, ManifestError, build_manifest, tensor_ranges
from cachemgr.names import ComponentRef

REF = ComponentRef("m", "base", "v1")


def test_tensor_ranges_come_from_the_header_and_match_the_bytes(tmp_path):
    tensors = {"b.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a.bias": np.ones(5, dtype=np.float16)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ranges = {r.name: r for r in tensor_ranges(path)}
    data = path.read_bytes()
    assert set(ranges) == {"a.bias", "b.weight"}
    for name, array in tensors.items():
        r = ranges[name]
        assert data[r.start:r.end] == array.tobytes()
        assert r.sha256 == hashlib.sha256(array.tobytes()).hexdigest()
        assert r.shape == array.shape
    assert ranges["b.weight"].dtype == "F32"


def test_build_manifest_describes_every_file_and_round_trips(tmp_path):
    (tmp_path / "unet").mkdir()
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(tmp_path / "unet" / "m.safetensors"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    manifest = build_manifest(REF, tmp_path, {"family": "sd"})
    assert [f.path for f in manifest.files] == ["model_index.json", "unet/m.safetensors"]
    entry = manifest.file("unet/m.safetensors")
    assert entry.size == (tmp_path / "unet" / "m.safetensors").stat().st_size
    assert entry.sha256 == hashlib.sha256((tmp_path / "unet" / "m.safetensors").read_bytes()).hexdigest()
    assert len(entry.tensors) == 1
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest


@pytest.mark.parametrize("bad", ["w.bin", "model.ckpt", "x.pt", "data.pkl", "weights.pth"])
def test_pickle_formats_are_refused_when_building(tmp_path, bad):
    (tmp_path / bad).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ManifestError, match="no pickled weights"):
        build_manifest(REF, tmp_path)


def _manifest_json(path: str, size: int = 1, tensors: list | None = None) -> str:
    return json.dumps({
        "model": "m", "component": "base", "version": "v1",
        "files": [{"path": path, "size": size, "sha256": "0" * 64, "tensors": tensors or []}],
    })


@pytest.mark.parametrize("path", ["../../etc/passwd.json", "/abs.json", "a/../../b.json", "x.bin", "manifest.json"])
def test_manifests_whose_paths_escape_or_load_pickles_are_refused(path):
    with pytest.raises(ManifestError):
        Manifest.from_json(_manifest_json(path))


def test_manifest_whose_tensor_ranges_lie_about_the_size_is_refused():
    tensors = [{"name": "w", "dtype": "F32", "shape": [4], "start": 8, "end": 99, "sha256": "0" * 64}]
    with pytest.raises(ManifestError, match="outside the file"):
        Manifest.from_json(_manifest_json("w.safetensors", size=16, tensors=tensors))


def test_malformed_manifest_json_is_a_clear_error():
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_json('{"model": "m"}')
