"""Several LoRA versions resident in one worker: one base load, one named adapter per LoRA, switched per job.

A switched adapter must give exactly the image of a pipeline that holds that adapter alone (same seed, same
thread count → the same PNG bytes); switching loads nothing and leaves the base weights untouched.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from cachemgr import Cache, LocalArchive, Release
from cachemgr.names import queue_for
from cachemgr.sync import sync_release
from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES, SHARED_BASE_RELEASES
from fleetstate.registry import WarmRegistry, WorkerState
from tasks.requests import BadRequest, GenerateRequest
from workers.models import LoadError, StableDiffusionXL, group_by_base
from workers.outputs import LocalOutputStore, read_uri
from workers.resident import NotResident
from workers.runtime import WorkerRuntime

from .support import image_data

PREVIOUS, CURRENT = SHARED_BASE_RELEASES
BASE_ONLY = f"{DEMO_MODEL}@base-v1.1.0"
JOBS = [(PREVIOUS, 1), (CURRENT, 1), (CURRENT, 2), (PREVIOUS, 2), (PREVIOUS, 3), (CURRENT, 3)]


def png_of(resident, release: str, seed: int, prompt: str = "Leather Jacket") -> bytes:
    return resident.generate(GenerateRequest(prompt=prompt, seed=seed), release)[0]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Workers run one torch thread; the same count here is what makes bytes comparable."""


@pytest.fixture(scope="module")
def cache(demo_archive_dir, tmp_path_factory) -> Cache:
    cache = Cache.at(tmp_path_factory.mktemp("l2"))
    archive = LocalArchive(demo_archive_dir)
    for text in (*SHARED_BASE_RELEASES, BASE_ONLY):
        sync_release(archive, cache.store, Release.parse(text))
    return cache


def build(cache: Cache, release: str, *shared: str):
    return StableDiffusionXL.builder(DEMO_MODEL, release).also_serving(*shared).with_cache(cache).on("cpu").build()


@pytest.fixture(scope="module")
def shared(cache):
    return build(cache, PREVIOUS, CURRENT)


@pytest.fixture(scope="module")
def alone(cache):
    """What a dedicated worker holds: one release, its adapter only."""
    return {release: build(cache, release) for release in SHARED_BASE_RELEASES}


@pytest.fixture(scope="module")
def expected(alone):
    return {(release, seed): png_of(alone[release], release, seed) for release, seed in JOBS}


def test_one_base_holds_the_adapters_of_both_releases(shared):
    assert shared.releases == [PREVIOUS, CURRENT]
    assert shared.adapter_names == ["lora_v2_3_0", "lora_v2_3_1"]
    assert sorted(shared.pipeline.get_list_adapters()["unet"]) == ["lora_v2_3_0", "lora_v2_3_1"]
    assert shared.active == PREVIOUS


def test_a_switched_adapter_gives_the_image_of_that_adapter_alone(shared, expected):
    for release, seed in JOBS:
        png = png_of(shared, release, seed)
        assert shared.active == release
        assert np.abs(pixels(png) - pixels(expected[(release, seed)])).max() == 0, (release, seed)
        assert png == expected[(release, seed)], (release, seed)


def test_the_build_gives_the_bytes_of_a_plain_diffusers_load(cache, alone, expected):
    """The builder leaves a CPU pipeline where loading put it (no `pipe.to` walk over every module); a default
    `from_pretrained` + `load_lora_weights` of the same L2 folders, called the same way, gives the same PNG bytes."""
    import dataclasses

    from diffusers import StableDiffusionXLPipeline

    from workers.models.base import LORA_WEIGHT_NAME, adapter_name

    release = Release.parse(CURRENT)
    lora = release.refs()[1]
    plain = StableDiffusionXLPipeline.from_pretrained(cache.store.path(release.base), local_files_only=True,
                                                      use_safetensors=True)
    plain.load_lora_weights(str(cache.store.path(lora)), weight_name=LORA_WEIGHT_NAME,
                            adapter_name=adapter_name(lora.version))
    plain.set_progress_bar_config(disable=True)
    resident = dataclasses.replace(alone[CURRENT], pipeline=plain, active=None)
    for seed in (1, 2):
        assert png_of(resident, CURRENT, seed) == expected[(CURRENT, seed)], seed


def test_the_two_adapters_really_differ(expected):
    """Otherwise the equality above would prove nothing."""
    assert expected[(PREVIOUS, 1)] != expected[(CURRENT, 1)]
    assert np.abs(pixels(expected[(PREVIOUS, 1)]) - pixels(expected[(CURRENT, 1)])).max() > 0


def test_switching_loads_nothing_and_fuses_nothing(shared, monkeypatch):
    unet = shared.pipeline.unet
    weights = {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_" not in name}
    pointers = {name: p.data_ptr() for name, p in unet.named_parameters()}

    def no_loading(*args, **kwargs):
        raise AssertionError("a switch must not load anything")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", no_loading)
    monkeypatch.setattr(shared.pipeline, "load_lora_weights", no_loading)
    shared.activate(PREVIOUS)
    switches = shared.switches
    for release in [CURRENT, PREVIOUS] * 5:
        shared.activate(release)
    assert shared.switches == switches + 10
    after = dict(unet.named_parameters())
    assert all(torch.equal(after[name], w) for name, w in weights.items())
    assert {name: p.data_ptr() for name, p in unet.named_parameters()} == pointers


def test_a_base_only_release_beside_lora_releases_runs_the_bare_base(cache, expected):
    mixed = build(cache, BASE_ONLY, CURRENT)
    bare = build(cache, BASE_ONLY)
    assert mixed.adapters == {BASE_ONLY: (), CURRENT: ("lora_v2_3_1",)}
    assert png_of(mixed, BASE_ONLY, 1) == png_of(bare, BASE_ONLY, 1)
    assert png_of(mixed, CURRENT, 1) == expected[(CURRENT, 1)]
    assert png_of(mixed, BASE_ONLY, 1) != expected[(CURRENT, 1)]


def test_a_release_it_does_not_hold_is_refused(shared):
    with pytest.raises(NotResident, match="is not resident here"):
        shared.activate(DEMO_RELEASES[0])


def test_releases_on_different_bases_refuse_to_share(cache):
    old, new = DEMO_RELEASES
    with pytest.raises(LoadError, match="do not share a base"):
        StableDiffusionXL.builder(DEMO_MODEL, old).also_serving(new).with_cache(cache).build()


def test_releases_are_grouped_by_base_so_each_base_loads_once():
    releases = [Release.parse(r) for r in (PREVIOUS, DEMO_RELEASES[0], CURRENT, BASE_ONLY, PREVIOUS)]
    groups = [[str(r) for r in group] for group in group_by_base(releases)]
    assert groups == [[PREVIOUS, CURRENT, BASE_ONLY], [DEMO_RELEASES[0]]]


def test_the_runtime_activates_the_release_of_each_jobs_queue(shared, expected, tmp_path):
    state = WorkerState(worker="w", node="n", pid=1, state="warm", releases=list(SHARED_BASE_RELEASES))
    runtime = WorkerRuntime("w", dict.fromkeys(SHARED_BASE_RELEASES, shared), LocalOutputStore(tmp_path), state)
    for i, (release, seed) in enumerate(JOBS):
        request = GenerateRequest(prompt="Leather Jacket", seed=seed)
        result = runtime.serve(request, task_id=f"job-{i}", queue=queue_for(release), sent_at=None)
        assert result["release"] == release
        assert image_data(read_uri(result["image_uri"])) == expected[(release, seed)]
        assert result["timings"]["switch_ms"] >= 0
    with pytest.raises(BadRequest, match="arrived on the queue of"):
        runtime.serve(GenerateRequest(prompt="x", release=PREVIOUS), "bad", queue_for(CURRENT), None)
    with pytest.raises(BadRequest, match="names no release"):
        runtime.serve(GenerateRequest(prompt="x"), "bad", None, None)


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
@pytest.mark.integration
def test_one_worker_serves_two_lora_releases_on_one_base(fleet_settings, producer, expected, tmp_path):
    """A worker started with two releases that share a base loads one pipeline, consumes both queues, and
    gives each job the image of its own release's adapter."""
    from .support import start_worker

    worker = start_worker(fleet_settings, list(SHARED_BASE_RELEASES), "w-shared", tmp_path / "logs")
    try:
        pending = [(release, seed, producer.generate.delay("Leather Jacket", seed=seed, release=release))
                   for release, seed in JOBS]
        for release, seed, result in pending:
            done = result.get(timeout=120)
            assert (done["release"], done["worker"]) == (release, "w-shared@testnode")
            assert image_data(read_uri(done["image_uri"])) == expected[(release, seed)], (release, seed)
        registry = WarmRegistry(redis.Redis.from_url(fleet_settings.broker_url))
        warm = registry.warm_workers()
        assert all(warm.get(release) == ["w-shared@testnode"] for release in SHARED_BASE_RELEASES)
        state = {w.worker: w for w in registry.workers()}["w-shared@testnode"]
        assert state.loads == 1
        assert state.jobs == len(JOBS)
        events = [json.loads(line) for line in fleet_settings.event_log_path.read_text().splitlines()]
        loads = [e for e in events if e["event"] == "L1_LOAD"]
        assert len(loads) == 1, loads
        assert loads[0]["adapters"] == "lora_v2_3_0,lora_v2_3_1"
    finally:
        worker.stop()
