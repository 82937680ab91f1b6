"""Dynamic batching: a worker that finds compatible jobs waiting runs them as one pipeline call, job by job otherwise.

The story: a batching worker (batch_max 4) is paused; a producer queues jobs; the worker resumes and serves
them. Compatible jobs share one pipeline call, yet each job keeps its own task id, seed, image key and result, and
each image is within PIXEL_TOLERANCE of the image the same job gives alone. Jobs of another size or a bad job
never share a batch; a bad job fails alone.
"""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from cachemgr import Cache, LocalArchive
from cachemgr.names import queue_for
from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES
from fleetstate.registry import WorkerState
from tasks.requests import BadRequest, GenerateRequest
from workers.batching import PIXEL_TOLERANCE, Job, enable_batching, plan_batches, prepare
from workers.models import StableDiffusionXL
from workers.outputs import LocalOutputStore, read_uri
from workers.runtime import WorkerRuntime

from .support import start_worker

OLD, NEW = DEMO_RELEASES
SMALL = {"width": 32, "height": 32, "steps": 2}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Workers run one torch thread; the same count here is what makes bytes comparable."""


@pytest.fixture(scope="module")
def direct(demo_archive_dir, tmp_path_factory):
    """The release loaded in this process: each job's unbatched twin comes from here."""
    cache = Cache.at(tmp_path_factory.mktemp("l2-direct"))
    return (StableDiffusionXL.builder(DEMO_MODEL, NEW).with_cache(cache).with_archive(LocalArchive(demo_archive_dir))
            .on("cpu").build())


@pytest.fixture(scope="module")
def batching_worker(fleet_settings, producer, tmp_path_factory):
    settings = fleet_settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 400.0})
    worker = start_worker(settings, [NEW], "w-batch", tmp_path_factory.mktemp("logs"))
    yield f"w-batch@{settings.node_name}"
    worker.stop()


def unit_runtime(direct, tmp_path) -> WorkerRuntime:
    """A worker's runtime in this process, around the direct pipeline; no Celery involved."""
    state = WorkerState(worker="w-unit", node="n", pid=1, state="warm", releases=[NEW])
    return WorkerRuntime("w-unit", {NEW: direct}, LocalOutputStore(tmp_path), state)


@contextmanager
def held(producer, worker: str):
    """Queue jobs while the worker consumes nothing, so they wait together; on exit it consumes again."""
    queue = queue_for(NEW)
    control = producer.app.control
    assert control.cancel_consumer(queue, destination=[worker], reply=True, timeout=10), "worker did not pause"
    try:
        yield
    finally:
        assert control.add_consumer(queue, destination=[worker], reply=True, timeout=10), "worker did not resume"


def test_jobs_queued_together_share_one_pipeline_call_yet_each_has_its_own_image(producer, batching_worker, direct):
    jobs = [("Leather Jacket", 11), ("a lighthouse", 12), ("Leather Jacket", 13), ("red boots", 14)]
    with held(producer, batching_worker):
        pending = [producer.generate.delay(prompt, seed=seed, release=NEW, **SMALL) for prompt, seed in jobs]
    results = [r.get(timeout=180) for r in pending]

    assert [r["batch_size"] for r in results] == [4, 4, 4, 4]
    assert len({r["batch_id"] for r in results}) == 1
    assert [r["task_id"] for r in results] == [p.id for p in pending]
    assert len({r["image_key"] for r in results}) == 4
    assert all(r["image_key"] == f"{r['task_id']}.png" for r in results)
    assert [r["seed"] for r in results] == [seed for _, seed in jobs]
    images = [read_uri(r["image_uri"]) for r in results]
    assert len(set(images)) == 4, "two jobs of a batch got the same image"
    for (prompt, seed), png in zip(jobs, images, strict=True):
        twin = direct.generate(GenerateRequest(prompt=prompt, seed=seed, **SMALL), NEW)[0]
        assert max_diff(png, twin) <= PIXEL_TOLERANCE, (prompt, seed)


def test_seedless_jobs_in_a_batch_take_the_seed_their_task_id_gives_them(producer, batching_worker):
    """As unbatched jobs do: a batched job, and any redelivery of it, makes the same image."""
    from tasks.requests import stable_seed

    with held(producer, batching_worker):
        pending = [producer.generate.delay(f"seedless {i}", release=NEW, **SMALL) for i in range(3)]
    results = [r.get(timeout=180) for r in pending]
    assert [r["batch_size"] for r in results] == [3, 3, 3]
    for r, p in zip(results, pending, strict=True):
        assert r["seed"] == stable_seed(GenerateRequest(prompt="x"), p.id).seed


def test_jobs_of_another_size_are_never_in_the_same_batch(producer, batching_worker):
    sizes = [32, 48, 32, 48]
    with held(producer, batching_worker):
        pending = [producer.generate.delay("size", seed=i, release=NEW, width=s, height=s, steps=2)
                   for i, s in enumerate(sizes)]
    results = [r.get(timeout=180) for r in pending]

    assert [r["width"] for r in results] == sizes
    by_batch: dict[str, set[int]] = {}
    for r in results:
        assert r["batch_size"] == 2
        by_batch.setdefault(r["batch_id"], set()).add(r["width"])
    assert sorted(by_batch.values(), key=min) == [{32}, {48}]


def test_a_bad_job_in_a_batch_fails_alone_and_the_others_are_batched(producer, batching_worker):
    queue = queue_for(NEW)
    with held(producer, batching_worker):
        first = producer.generate.delay("good one", seed=1, release=NEW, **SMALL)
        invalid = producer.app.send_task("warmfleet.generate", args=["x"], kwargs={"steps": 0}, queue=queue)
        misrouted = producer.app.send_task("warmfleet.generate", kwargs={"prompt": "x", "release": OLD}, queue=queue)
        second = producer.generate.delay("good two", seed=2, release=NEW, **SMALL)
    good = [first.get(timeout=180), second.get(timeout=180)]
    with pytest.raises(Exception, match="steps must be between 1 and") as bad:
        invalid.get(timeout=60)
    assert type(bad.value).__name__ == "BadRequest"
    with pytest.raises(Exception, match="arrived on the queue of"):
        misrouted.get(timeout=60)
    assert [g["batch_size"] for g in good] == [2, 2]
    assert good[0]["batch_id"] == good[1]["batch_id"]


def test_a_batch_whose_pipeline_call_fails_runs_its_jobs_one_at_a_time(direct, tmp_path):
    """If the batched call raises, nothing is prepared: each job runs alone and only the bad one fails."""

    class Exploding:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __call__(self, **kwargs):
            prompts = kwargs["prompt"] if isinstance(kwargs["prompt"], list) else [kwargs["prompt"]]
            if "boom" in prompts:
                raise RuntimeError("this prompt breaks the pipeline")
            return self.inner(**kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Request:
        def __init__(self, task_id: str) -> None:
            self.id = task_id

    original = direct.pipeline
    direct.pipeline = Exploding(original)
    try:
        runtime = unit_runtime(direct, tmp_path)
        jobs = [Job(Request(f"job-{i}"), GenerateRequest(prompt=p, seed=i, **SMALL), queue_for(NEW))
                for i, p in enumerate(["fine", "boom", "also fine"])]
        batches = plan_batches(runtime, jobs, batch_max=4)
        assert [[j.task_id for j in b] for b in batches] == [["job-0", "job-1", "job-2"]]
        assert prepare(runtime, batches[0]) == 0
        assert len(runtime.prepared) == 0
        outcomes = {}
        for job in jobs:
            try:
                outcomes[job.task_id] = runtime.serve(job.generate, job.task_id, job.queue, None)["image_key"]
            except RuntimeError as exc:
                outcomes[job.task_id] = str(exc)
        assert outcomes == {"job-0": "job-0.png", "job-1": "this prompt breaks the pipeline", "job-2": "job-2.png"}
    finally:
        direct.pipeline = original


def test_a_prepared_image_is_served_once_under_its_own_key(direct, tmp_path):
    runtime = unit_runtime(direct, tmp_path)
    runtime.batching = True

    class Request:
        def __init__(self, task_id: str) -> None:
            self.id = task_id

    jobs = [Job(Request(f"t{i}"), GenerateRequest(prompt="Leather Jacket", seed=i, **SMALL), queue_for(NEW))
            for i in range(2)]
    assert prepare(runtime, jobs) == 2
    first = runtime.serve(jobs[0].generate, "t0", queue_for(NEW), None)
    assert first["batch_size"] == 2 and first["image_key"] == "t0.png"
    assert "t0" not in runtime.prepared and "t1" in runtime.prepared
    again = runtime.serve(jobs[0].generate, "t0", queue_for(NEW), None)  # a redelivery: runs alone, same key
    assert again["batch_size"] == 1 and again["batch_id"] is None and again["image_key"] == "t0.png"


def test_batch_max_1_installs_nothing(producer, direct, tmp_path):
    runtime = unit_runtime(direct, tmp_path)
    task = producer.app.tasks["warmfleet.generate"]
    before = task.Strategy
    assert enable_batching(producer.app, runtime, batch_max=1, batch_wait_ms=20) is None
    assert task.Strategy == before and runtime.batching is False


def test_bad_requests_are_not_planned_into_a_batch(direct, tmp_path):
    runtime = unit_runtime(direct, tmp_path)

    class Request:
        def __init__(self, task_id: str) -> None:
            self.id = task_id

    ok = GenerateRequest(prompt="x", seed=1, **SMALL)
    jobs = [Job(Request("a"), ok, queue_for(NEW)), Job(Request("b"), None, queue_for(NEW)),
            Job(Request("c"), GenerateRequest(prompt="x", release=OLD, **SMALL), queue_for(NEW)),
            Job(Request("d"), ok, queue_for(NEW)), Job(Request("e"), GenerateRequest(prompt="y", **SMALL), None)]
    assert [[j.task_id for j in b] for b in plan_batches(runtime, jobs, batch_max=8)] == [["a", "d", "e"]]
    with pytest.raises(BadRequest):
        runtime.pick(jobs[2].generate, jobs[2].queue)


def test_a_worker_killed_mid_batch_loses_no_job_and_each_is_served_again_under_its_own_id(
        fleet_settings, producer, tmp_path):
    """Every message of a batch stays unacked until its own job is stored: a SIGKILL mid-call loses none."""
    import signal
    import time

    import redis

    settings = fleet_settings.model_copy(update={"batch_max": 4, "batch_wait_ms": 400.0, "visibility_timeout": 10})
    client = redis.Redis.from_url(settings.broker_url)
    queue = queue_for(OLD)  # a queue no other worker of this module consumes
    slow = {"width": 64, "height": 64, "steps": 40}
    pending = [producer.generate.delay("survive", seed=i, release=OLD, **slow) for i in range(4)]
    doomed = start_worker(settings, [OLD], "w-doomed", tmp_path / "logs")
    try:
        deadline = time.monotonic() + 120
        while not (client.llen(queue) == 0 and client.hlen("unacked") >= 4):
            assert time.monotonic() < deadline, "the batch never formed"
            time.sleep(0.05)
        time.sleep(0.5)  # inside the batched pipeline call
        assert not any(r.ready() for r in pending)
        doomed.stop(signal.SIGKILL)
    finally:
        doomed.stop()
    rescuer = start_worker(settings, [OLD], "w-rescuer", tmp_path / "logs")
    try:
        results = [r.get(timeout=180) for r in pending]
    finally:
        rescuer.stop()
    assert [r["task_id"] for r in results] == [p.id for p in pending]
    assert all(r["worker"] == f"w-rescuer@{settings.node_name}" for r in results)
    assert all(r["image_key"] == f"{r['task_id']}.png" for r in results)
