"""A new LoRA version goes live on a running worker: loaded beside the old one between two jobs, no new process, no
base reload. Then promote, roll back and retire work on it as on any warm release, and refusals are one line.

One fleet for the module: a private archive (the demo models plus LoRA v2.4.0 for the nano-banana base and a LoRA
of the wrong shape), worker `w-live` on base v1.1.0 + LoRA v2.3.1 and worker `w-other` on base v1.0.0.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import redis

from beat_schedule import AUTO_WARM_TASK, build_schedule
from cachemgr import Cache, LocalArchive, Release
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_release
from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES, SHARED_BASE_RELEASES, build_lora, build_sd, build_sdxl
from fleetstate.pins import Pins, protected_refs
from fleetstate.registry import WarmRegistry
from fleetstate.routes import RouteTable
from tasks.maintenance import sync_l2
from tasks.prewarm import auto_warm, missing_prewarms
from tasks.requests import GenerateRequest
from tasks.settings import FleetSettings
from workers.models import StableDiffusionXL
from workers.outputs import read_uri

from .support import image_data, start_worker, wait_warm
from .support import run_cli as run_fleet_cli

pytestmark = pytest.mark.integration

OTHER_BASE, OLD = DEMO_RELEASES  # base v1.0.0 + LoRA v2.3.0; base v1.1.0 + LoRA v2.3.1
NEW = f"{DEMO_MODEL}@base-v1.1.0+lora-v2.4.0"
BAD = f"{DEMO_MODEL}@base-v1.1.0+lora-v9.0.0"  # an SD LoRA published under the SDXL model: wrong shapes
THIRD = SHARED_BASE_RELEASES[0]  # base v1.1.0 + LoRA v2.3.0
PREWARM = f"{DEMO_MODEL}@base-v1.0.0+lora-v2.3.1"  # a LoRA for w-other's base that w-other does not serve
LIVE, OTHER = "w-live@testnode", "w-other@testnode"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The worker runs one torch thread; the in-process twin must too, or the bytes differ."""


@pytest.fixture(scope="module")
def archive_dir(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo archive plus a new LoRA version on the active base and one built for another model's shapes."""
    root = tmp_path_factory.mktemp("live-archive") / "archive"
    shutil.copytree(demo_archive_dir, root)
    work = tmp_path_factory.mktemp("live-build")
    archive = LocalArchive(root)
    base = build_sdxl(work / "base", 1100)
    archive.publish(ComponentRef(DEMO_MODEL, "lora", "v2.4.0"), build_lora(base, "sdxl", work / "new", 2400),
                    meta={"family": "sdxl"})
    sd = build_sd(work / "sd", 3000)
    archive.publish(ComponentRef(DEMO_MODEL, "lora", "v9.0.0"), build_lora(sd, "sd", work / "bad", 9000),
                    meta={"family": "sdxl"})
    return root


@pytest.fixture(scope="module")
def fleet_settings(redis_server, archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    return FleetSettings(home=tmp_path_factory.mktemp("home"), broker_url=redis_server.url,
                         archive_url=archive_dir.as_uri(), torch_threads=1, heartbeat_seconds=1.0,
                         warm_ttl_seconds=4.0, route_cache_ttl=0.0, node_name="testnode", max_resident_adapters=2)


@pytest.fixture(scope="module")
def fleet(fleet_settings: FleetSettings, producer, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("logs")
    workers = [start_worker(fleet_settings, [OLD], "w-live", logs, wait=False),
               start_worker(fleet_settings, [OTHER_BASE], "w-other", logs, wait=False)]
    try:
        for w in workers:
            wait_warm(fleet_settings, w)
        client = redis.Redis.from_url(fleet_settings.broker_url)
        RouteTable(client).set_active(OLD, actor="test")
        yield {"client": client, "registry": WarmRegistry(client), "live": workers[0]}
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def twin(fleet_settings: FleetSettings, archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """What a worker started fresh on a release would make: its own pipeline, that release's adapter alone."""
    cache = Cache.at(tmp_path_factory.mktemp("twin-l2"))
    built = {}

    def image(release: str, seed: int) -> bytes:
        if release not in built:
            sync_release(LocalArchive(archive_dir), cache.store, Release.parse(release))
            built[release] = StableDiffusionXL.builder(DEMO_MODEL, release).with_cache(cache).on("cpu").build()
        return built[release].generate(GenerateRequest(prompt="Leather Jacket", seed=seed), release)[0]

    return image


class Load(threading.Thread):
    """Jobs sent through the route, one every `every` seconds, until stopped: the designers keep working."""

    def __init__(self, producer, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.producer, self.every, self.sent = producer, every, []
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopping.wait(self.every):
            try:
                self.sent.append(self.producer.generate.delay("Leather Jacket", seed=100 + i))
            except RuntimeError as exc:
                # the CLI runs in this process and configure() resets kombu's process-wide pools under a send in
                # flight ("Acquire on closed pool"): nothing was sent, send it again on the new pool
                if "closed pool" not in str(exc):
                    raise
                self.sent.append(self.producer.generate.delay("Leather Jacket", seed=100 + i))
            i += 1

    def finish(self) -> list[dict]:
        self.stopping.set()
        self.join()
        return [r.get(timeout=120) for r in self.sent]


def run_cli(settings: FleetSettings, *args: str):  # noqa: ANN201 - click's Result
    """The CLI, reading this module's private archive."""
    return run_fleet_cli(settings, *args, env={"FLEET_ARCHIVE_URL": settings.archive_url})


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_new_lora_goes_live_under_load_then_promote_rollback_retire(fleet, fleet_settings, producer, twin):
    registry = fleet["registry"]
    before = registry.worker(LIVE)
    assert before.loads == 1 and before.lora_params > 0
    load = Load(producer)
    load.start()
    time.sleep(1.0)

    warmed = run_cli(fleet_settings, "warm", NEW, "--on", "w-live")
    assert warmed.exit_code == 0, warmed.output
    assert f"{LIVE}: warm on {NEW}" in warmed.output
    assert LIVE in registry.warm_workers(NEW).get(NEW, [])
    during = registry.worker(LIVE)
    assert during.loads == 1, "warming a LoRA must not load the base again"
    assert during.lora_params == 2 * before.lora_params  # same rank and targets: twice the LoRA layers
    assert during.pid == fleet["live"].pid

    for args in (("promote", DEMO_MODEL, NEW), ("rollback", DEMO_MODEL), ("promote", DEMO_MODEL, NEW)):
        time.sleep(1.0)
        changed = run_cli(fleet_settings, *args)
        assert changed.exit_code == 0, changed.output
    time.sleep(1.0)
    results = load.finish()
    assert len(results) == len(load.sent) > 8  # every job sent came back: none lost
    served = [r["release"] for r in results]
    assert {OLD, NEW} <= set(served) and served[-1] == NEW
    assert all(r["worker"] == LIVE for r in results)

    fresh = producer.generate.delay("Leather Jacket", seed=7, release=NEW).get(timeout=60)
    assert image_data(read_uri(fresh["image_uri"])) == twin(NEW, 7)
    assert twin(NEW, 7) != twin(OLD, 7)

    refused = run_cli(fleet_settings, "retire", OLD, "--on", "w-live")
    assert "routed (previous)" in one_line(refused)
    retired = run_cli(fleet_settings, "retire", OLD, "--on", "w-live", "--force")
    assert retired.exit_code == 0, retired.output
    after = registry.worker(LIVE)
    assert after.releases == [NEW] and OLD not in registry.warm_workers()
    assert after.lora_params == before.lora_params < during.lora_params  # the old adapter's memory is freed
    assert after.loads == 1
    again = producer.generate.delay("Leather Jacket", seed=7).get(timeout=60)
    assert again["release"] == NEW and image_data(read_uri(again["image_uri"])) == twin(NEW, 7)


def test_refusals_are_one_line(fleet, fleet_settings):
    assert "not base-v1.1.0" in one_line(run_cli(fleet_settings, "warm", NEW, "--on", "w-other")).replace(
        "serves base-v1.0.0 of nano-banana, ", "")
    assert "unknown release" in one_line(run_cli(fleet_settings, "warm", f"{DEMO_MODEL}@base-v1.1.0+lora-v7.7.7",
                                                 "--on", "w-live"))
    assert "routed (active)" in one_line(run_cli(fleet_settings, "retire", NEW, "--everywhere"))


def test_a_failed_load_leaves_the_worker_serving_what_it_served(fleet, fleet_settings, producer, twin):
    failed = run_cli(fleet_settings, "warm", BAD, "--on", "w-live")
    assert f"{LIVE}: failed: cannot load {BAD}" in one_line(failed)
    state = fleet["registry"].worker(LIVE)
    assert state.state == "warm" and state.releases == [NEW] and "size mismatch" in state.warm_error
    status = run_cli(fleet_settings, "status")
    assert "size mismatch" in status.output
    result = producer.generate.delay("Leather Jacket", seed=7).get(timeout=60)
    assert image_data(read_uri(result["image_uri"])) == twin(NEW, 7)


def test_the_adapter_budget_evicts_the_least_recently_used_or_refuses(fleet, fleet_settings, producer):
    """Budget 2. NEW is active and OLD (retired above) is the route's previous release, so warming OLD back must make
    room: THIRD, which nothing routes, goes — unless it is pinned, and then the warm is refused in one line."""
    registry, client = fleet["registry"], fleet["client"]
    assert run_cli(fleet_settings, "warm", THIRD, "--on", "w-live").exit_code == 0  # 2 of 2 adapters
    assert producer.generate.delay("Leather Jacket", seed=3, release=THIRD).get(timeout=60)["release"] == THIRD
    pin = ComponentRef(DEMO_MODEL, "lora", "v2.3.0")
    Pins(client).add(pin)
    try:
        full = one_line(run_cli(fleet_settings, "warm", OLD, "--on", "w-live"))
        assert "holds its most adapters" in full and "none can go" in full
    finally:
        Pins(client).remove(pin)
    evicted = run_cli(fleet_settings, "warm", OLD, "--on", "w-live")
    assert evicted.exit_code == 0, evicted.output
    state = registry.worker(LIVE)
    assert sorted(state.releases) == sorted([NEW, OLD]) and state.loads == 1
    assert THIRD not in registry.warm_workers()  # the release nothing routed or pinned went
    assert run_cli(fleet_settings, "rollback", DEMO_MODEL).exit_code == 0  # warm again: rollback is allowed
    assert producer.generate.delay("Leather Jacket", seed=3).get(timeout=60)["release"] == OLD


def test_a_declared_prewarm_goes_live_on_the_workers_of_its_base_by_itself(fleet, fleet_settings, producer):
    """`routes prewarm` declares a release; with FLEET_AUTO_WARM on, a node's sync (or beat's tick) sends the warm
    command to every running worker of its base that lacks it — nobody runs `warm`. Off, nothing is sent."""
    registry, client = fleet["registry"], fleet["client"]
    declared = run_cli(fleet_settings, "routes", "prewarm", DEMO_MODEL, PREWARM)
    assert declared.exit_code == 0, declared.output
    assert f"prewarm + {PREWARM}" in run_cli(fleet_settings, "routes", "history", DEMO_MODEL, "-n", "1").output
    assert protected_refs(client)[ComponentRef(DEMO_MODEL, "base", "v1.0.0")] == "declared prewarm"
    assert missing_prewarms(client) == {PREWARM: [OTHER]}  # w-live serves another base
    assert missing_prewarms(client, node="elsewhere") == {}  # a node's sync warms only its own workers

    assert fleet_settings.auto_warm is False and "auto-warm" not in build_schedule(fleet_settings)
    assert auto_warm(fleet_settings) == {"skipped": "FLEET_AUTO_WARM is off"}
    time.sleep(1.5)
    assert PREWARM not in registry.worker(OTHER).releases

    on = fleet_settings.model_copy(update={"auto_warm": True})
    assert build_schedule(on)["auto-warm"]["task"] == AUTO_WARM_TASK
    producer.app.fleet_settings = on  # the node's maintenance worker, with the setting on, runs its sync
    try:
        synced = sync_l2.run(refs=[str(ref) for ref in Release.parse(PREWARM).refs()])
    finally:
        producer.app.fleet_settings = fleet_settings
    assert synced["auto_warm"] == {PREWARM: {OTHER: f"{OTHER} warming {PREWARM}"}}
    deadline = time.monotonic() + 60
    while PREWARM not in registry.worker(OTHER).releases and time.monotonic() < deadline:
        time.sleep(0.1)
    state = registry.worker(OTHER)
    assert PREWARM in state.releases and state.loads == 1 and not state.warm_error  # no base load
    assert OTHER in registry.warm_workers(PREWARM).get(PREWARM, [])
    served = producer.generate.delay("Leather Jacket", seed=5, release=PREWARM).get(timeout=60)
    assert served["worker"] == OTHER and served["release"] == PREWARM
    assert auto_warm(on) == {}  # beat's tick finds it warm everywhere it can be: nothing more to send

    assert "declared prewarm" in one_line(run_cli(fleet_settings, "retire", PREWARM, "--on", "w-other"))
    removed = run_cli(fleet_settings, "routes", "prewarm", DEMO_MODEL, PREWARM, "--remove")
    assert removed.exit_code == 0 and "withdrawn" in removed.output
    assert f"prewarm - {PREWARM}" in run_cli(fleet_settings, "routes", "history", DEMO_MODEL, "-n", "1").output
    assert run_cli(fleet_settings, "retire", PREWARM, "--on", "w-other").exit_code == 0
    assert "declared prewarm" not in protected_refs(client).values()


def test_a_prewarm_of_an_unknown_or_foreign_release_is_refused_in_one_line(fleet, fleet_settings):
    assert "publish it first" in one_line(run_cli(fleet_settings, "routes", "prewarm", DEMO_MODEL,
                                                  f"{DEMO_MODEL}@base-v1.0.0+lora-v7.7.7"))
    assert "not other-model" in one_line(run_cli(fleet_settings, "routes", "prewarm", "other-model", PREWARM))
