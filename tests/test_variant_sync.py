"""A version published in fp32 and fp16: each node fetches only the precision it computes in, at worker boot and in
the nightly sync alike, and a subset kept for one precision never passes for the whole version.

A real archive and L2 store on disk, with a diffusers-shaped folder of real safetensors files in both precisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cachemgr import Cache, LocalArchive
from cachemgr.names import ComponentRef
from cachemgr.repair import verify_ref
from cachemgr.sync import sync_ref
from cachemgr.variants import files_for
from tasks.maintenance import run_sync
from tasks.settings import FleetSettings

REF = ComponentRef("mixed", "base", "v1")
META = {"family": "sd", "layout": "diffusers", "variants": ["fp16"], "plain_weights": True}


@pytest.fixture
def archive(tmp_path: Path) -> LocalArchive:
    src = tmp_path / "src"
    for part, n in (("unet", 64), ("vae", 32)):
        (src / part).mkdir(parents=True)
        weights = {"w": torch.arange(n * n, dtype=torch.float32).reshape(n, n)}
        save_file(weights, str(src / part / "diffusion_pytorch_model.safetensors"))
        save_file({k: v.half() for k, v in weights.items()}, str(src / part / "diffusion_pytorch_model.fp16.safetensors"))
        (src / part / "config.json").write_text(json.dumps({"part": part}))
    (src / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    archive = LocalArchive(tmp_path / "archive")
    archive.publish(REF, src, meta=META)
    return archive


def weights(archive: LocalArchive, fp16: bool) -> list:
    return [f for f in archive.read_manifest(REF).files
            if f.path.endswith(".safetensors") and (".fp16." in f.path) == fp16]


def test_an_fp32_worker_on_a_node_that_kept_the_fp16_subset_fetches_its_own_files(archive, tmp_path):
    store = Cache.at(tmp_path / "l2").store
    first = sync_ref(archive, store, REF, select=files_for("float16"))
    assert first.outcome == "UPDATED" and first.bytes_fetched < archive.read_manifest(REF).total_size
    assert all(store.has_blob(f.sha256) for f in weights(archive, fp16=True))
    assert not any(store.has_blob(f.sha256) for f in weights(archive, fp16=False))
    assert store.has(REF) and store.has(REF, files_for("float16"))
    assert not store.has(REF, files_for("float32"))  # the subset does not pass for the fp32 files
    assert store.missing(REF, files_for("float32")) == {f.path for f in weights(archive, fp16=False)}

    second = sync_ref(archive, store, REF, select=files_for("float32"))
    assert second.outcome == "UPDATED"
    assert second.bytes_fetched == sum(f.size for f in weights(archive, fp16=False))
    assert store.has(REF, files_for("float32")) and store.has(REF, files_for("float16"))
    snapshot = store.path(REF)
    for f in archive.read_manifest(REF).files:  # both precisions are linked and verified in the one snapshot
        assert (snapshot / f.path).resolve() == store.blob_path(f.sha256).resolve()
    assert all(c.ok for c in store.check(REF))
    assert sync_ref(archive, store, REF, select=files_for("float16")).outcome == "UNCHANGED"
    assert sync_ref(archive, store, REF).outcome == "UNCHANGED"  # now complete: no filter finds nothing missing


def test_an_unfiltered_sync_completes_a_subset(archive, tmp_path):
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF, select=files_for("float16"))
    assert not store.has(REF, lambda m: None)
    report = sync_ref(archive, store, REF)
    assert report.outcome == "UPDATED" and report.bytes_fetched == sum(f.size for f in weights(archive, fp16=False))
    assert {f.path for f in store.manifest(REF).files} == {f.path for f in archive.read_manifest(REF).files}


def test_repairing_a_subset_fetches_only_that_subset_again(archive, tmp_path):
    store = Cache.at(tmp_path / "l2").store
    sync_ref(archive, store, REF, select=files_for("float16"))
    blob = store.blob_path(weights(archive, fp16=True)[0].sha256)
    blob.chmod(0o644)
    blob.write_bytes(b"rot" + blob.read_bytes()[3:])
    assert verify_ref(archive, store, REF) == [weights(archive, fp16=True)[0].path]
    assert not any(store.has_blob(f.sha256) for f in weights(archive, fp16=False))
    assert store.has(REF, files_for("float16")) and not store.has(REF, files_for("float32"))


@pytest.mark.parametrize("dtype,fetched", [("float16", True), ("float32", False)])
def test_the_nightly_sync_fetches_only_the_nodes_precision(archive, tmp_path, dtype, fetched):
    settings = FleetSettings(home=tmp_path / "home", archive_url=archive.root.absolute().as_uri(), broker_url=None,
                             cache_root=tmp_path / "l2", dtype=dtype, worker_releases=["mixed@base-v1"])
    result = run_sync(settings)
    assert result["versions"] == [f"{REF} UPDATED"]
    store = Cache.at(tmp_path / "l2").store
    assert all(store.has_blob(f.sha256) == fetched for f in weights(archive, fp16=True))
    assert all(store.has_blob(f.sha256) != fetched for f in weights(archive, fp16=False))
    assert result["bytes_fetched"] < archive.read_manifest(REF).total_size
