"""A GPU worker's life: ensure L2 → warm L1 → announce → consume. It never loads a model to serve a job."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from tasks.settings import FleetSettings, offline_environment

log = logging.getLogger("warmfleet.worker")


def worker_name(settings: FleetSettings, releases: list[str], name: str | None) -> str:
    if name:
        return name if "@" in name else f"{name}@{settings.node_name}"
    return f"gpu-{os.getpid()}@{settings.node_name or socket.gethostname()}"


def build_verified(build, verify):
    """`build()` while `verify()` re-hashes the same L2 files in a thread beside it (hashlib releases the GIL: the
    check costs no time of its own where the build leaves a core free). Nothing is returned, so nothing serves, before
    both have ended. `verify()` returns the paths it repaired or raises when L2 stays corrupt; a build that may have
    read bytes being repaired is discarded and done again from the repaired snapshot."""
    outcome: dict = {}

    def check() -> None:
        try:
            outcome["repaired"] = verify()
        except BaseException as exc:  # handed to the boot thread below
            outcome["error"] = exc

    checker = threading.Thread(target=check, name="warmfleet-verify-l2", daemon=True)
    checker.start()
    try:
        resident = build()
    except Exception:
        checker.join()
        if "error" in outcome:
            raise outcome["error"] from None  # the corrupt L2 is the cause, not what the build made of it
        if outcome.get("repaired"):
            return build()  # it read files while they were being replaced
        raise
    checker.join()
    if "error" in outcome:
        raise outcome["error"]
    if outcome["repaired"]:
        del resident  # built from the bytes the check found corrupt
        return build()
    return resident


def _catalog(client, archive) -> None:  # noqa: ANN001 - redis.Redis, cachemgr.Archive
    """List the whole archive into the fleet's catalog (fleetstate/catalog.py), so routing and producers know what can
    be served; a listing that fails leaves the catalog as it was (the sync below says what is wrong)."""
    from fleetstate.catalog import Catalog

    try:
        Catalog(client).refresh(archive)
    except Exception as exc:  # the archive unreachable: the worker may still boot from its L2
        log.warning("could not list the archive for the catalog: %s", exc)


def run_worker(settings: FleetSettings, releases: list[str], name: str | None = None, loglevel: str = "INFO") -> int:
    offline_environment()
    import redis
    import torch

    from cachemgr import Cache, EventLog, Release
    from cachemgr.names import queue_for
    from cachemgr.repair import verify_ref
    from cachemgr.sync import sync_release
    from fleetstate.orphans import SWEEP_SECONDS, Sweeper
    from fleetstate.registry import Heartbeat, WarmRegistry, WorkerState
    from fleetstate.stats import FleetStats
    from tasks import app, configure
    from tasks.peering import peer_source

    from .batching import enable_batching
    from .breaker import FailureBreaker, sick_handler
    from .device import DeviceError, resolve_device, resolve_dtype
    from .gpu import sample_into
    from .jobs import JobRunner
    from .live import LiveAdapters, attach_live
    from .models import builder_for, family_of, group_by_base
    from .models.layouts import files_for
    from .outputs import open_output_store
    from .runtime import WorkerRuntime

    if not releases:
        print("warmfleet worker: name at least one release (--release or FLEET_WORKER_RELEASES)", file=sys.stderr)
        return 2
    torch.set_num_threads(settings.torch_threads)
    torch.set_num_interop_threads(1)
    configure(settings)
    hostname = worker_name(settings, releases, name)
    try:  # before any sync or load: a device this node lacks is one line now, not an error after minutes
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
    except DeviceError as exc:
        print(f"warmfleet worker: {exc}", file=sys.stderr)
        return 2
    broker = settings.resolved_broker_url
    if not broker:
        print("warmfleet worker: no broker; set FLEET_BROKER_URL or start a local fleet", file=sys.stderr)
        return 2
    registry = WarmRegistry(settings.state_client(), ttl=settings.warm_ttl_seconds)
    state = WorkerState(worker=hostname, node=settings.node_name, pid=os.getpid(), state="loading",
                        releases=list(releases), device=device)
    registry.publish(state)
    stats = FleetStats(registry.redis)
    events = EventLog(settings.event_log_path, settings.node_name, sinks=[stats.sink])
    cache = Cache.at(settings.resolved_cache_root)
    pipelines = {}
    try:
        archive = settings.open_archive()
        _catalog(registry.redis, archive)
        for group in group_by_base([Release.parse(text) for text in releases]):
            dtype = resolve_dtype(settings.dtype, device)
            for release in group:  # a node fetches only the precision it computes in, from its peers first
                sync_release(archive, cache.store, release, events=events, select=files_for(dtype),
                             peers=peer_source(settings, registry.redis, events))
                events.emit("L2_WARMUP", release=str(release), outcome="READY")
            first = group[0]

            def build(first=first, group=group, dtype=dtype):
                return (builder_for(family_of(cache.store, first)).builder(first.model, first)
                        .also_serving(*group[1:]).with_cache(cache).on(device, dtype).with_events(events).build())

            def verify(refs=tuple(dict.fromkeys(ref for release in group for ref in release.refs()))):
                peers = peer_source(settings, registry.redis, events)  # a repair asks the site's peers first
                return [path for ref in refs for path in verify_ref(archive, cache.store, ref, events=events,
                                                                     trust_seconds=settings.verify_l2_trust_seconds,
                                                                     peers=peers)]

            # bit rot on disk: quarantine and fetch again, or refuse to load; re-hashed beside the build
            resident = build_verified(build, verify) if settings.verify_l2_at_boot else build()
            pipelines.update(dict.fromkeys(resident.releases, resident))
            state.l1_bytes += resident.nbytes
            state.loads += 1  # releases that differ only in their LoRA share one pipeline: one load
    except Exception as exc:
        state.state = "failed"
        state.error = f"{type(exc).__name__}: {exc}"
        registry.publish(state)
        events.emit("L1_LOAD", outcome="FAILED", worker=hostname, releases=",".join(releases), reason=state.error)
        log.error("worker %s failed to load and will not consume: %s", hostname, state.error)
        print(f"warmfleet worker {hostname}: failed to load: {state.error}", file=sys.stderr)
        return 3

    outputs = open_output_store(settings.resolved_output_url, **settings.oss_options())

    # Nothing per job here: the job's completion script (fleetstate/leases.py) counts it fleet-wide and sets this
    # worker's job count in the registry; the heartbeat publishes the rest of its state (device memory).
    runtime = WorkerRuntime(hostname, pipelines, outputs, state)
    queues = ",".join(queue_for(r) for r in releases)
    breaker = FailureBreaker(settings.failure_breaker, sick_handler(app, registry, state, queues.split(","), events))
    JobRunner(runtime, registry.redis, settings, breaker).attach(app)
    enable_batching(app, runtime, settings.batch_max, settings.batch_wait_ms)  # batch_max 1: nothing changes
    live = LiveAdapters(runtime, registry, archive, cache.store, events, settings.max_resident_adapters,
                        settings.max_adapter_bytes)
    attach_live(app, live)  # `warmfleet warm` / `retire`: adapters loaded and deleted between two jobs
    rewarm = live.rewarm_recorded()  # what was warmed live before a restart: loaded again between the first jobs
    if rewarm:
        log.info("worker %s warms again what was warmed live before: %s", hostname, ", ".join(rewarm))
    state.lora_params, state.lora_bytes = live.footprint()
    state.state = "warm"
    sample_into(state, device)
    registry.publish(state)
    heartbeat = Heartbeat(registry, state, settings.heartbeat_seconds, l2=cache.store,
                          refresh=lambda current: sample_into(current, device))
    heartbeat.start()
    # jobs of dead peers back in their queue within the heartbeat TTL; lost sends sent again (fleetstate/outbox.py)
    sweeper = Sweeper(registry.redis, outbox_grace=settings.outbox_grace_seconds,
                      settle=settings.heartbeat_seconds + SWEEP_SECONDS)
    sweeper.start()
    log.info("worker %s warm on %s; consuming %s", hostname, ", ".join(releases), queues)
    try:
        app.worker_main(
            argv=[
                "worker", "--pool=solo", "--concurrency=1", f"--queues={queues}",
                f"--prefetch-multiplier={settings.batch_max}",  # 1 unless batching: the buffer fills from prefetch
                f"--hostname={hostname}", f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
                "--task-events",
            ]
        )
    finally:
        heartbeat.stop()
        sweeper.stop()
        state.state = "stopping"
        try:
            registry.withdraw(state)
        except redis.RedisError:
            pass
    return 0


def run_maintenance_worker(settings: FleetSettings, name: str | None = None, loglevel: str = "INFO") -> int:
    """The node's maintenance worker: runs sync and audit so GPU workers never stop serving for them.

    It consumes the fleet's shared maintenance queue (fan-out tasks from beat) and its node's own queue,
    and registers the node so fleet-wide maintenance reaches this disk."""
    offline_environment()
    import threading

    import redis

    from beat_schedule import MAINTENANCE_QUEUE
    from cachemgr.names import node_queue
    from fleetstate.nodes import NodeRegistry
    from fleetstate.orphans import SWEEP_SECONDS, Sweeper
    from tasks import app, configure

    configure(settings)
    hostname = name or f"maintenance@{settings.node_name}"
    broker = settings.resolved_broker_url
    if not broker:
        print("warmfleet maintenance-worker: no broker; set FLEET_BROKER_URL or start a local fleet", file=sys.stderr)
        return 2
    from tasks.peering import announce, start_peer_server

    nodes = NodeRegistry(settings.state_client())
    stop = threading.Event()
    try:
        peer_server = start_peer_server(settings)  # serves this node's verified L2 blobs to the site's other nodes
    except OSError as exc:
        print(f"warmfleet maintenance-worker: cannot listen for peers on {settings.peer_address}:"
              f"{settings.peer_port} ({exc}); set FLEET_PEER_ADDRESS / FLEET_PEER_PORT", file=sys.stderr)
        return 1

    def beat() -> None:
        while True:
            try:
                nodes.seen(settings.node_name)
                if peer_server is not None:
                    announce(nodes.redis, settings, peer_server)
            except redis.RedisError:
                pass
            if stop.wait(60):
                return

    threading.Thread(target=beat, name="warmfleet-node", daemon=True).start()
    # jobs of dead GPU workers back in their queue, and lost sends sent again, even with no GPU worker idle
    sweeper = Sweeper(nodes.redis, outbox_grace=settings.outbox_grace_seconds,
                      settle=settings.heartbeat_seconds + SWEEP_SECONDS)
    sweeper.start()
    try:
        app.worker_main(
            argv=["worker", "--pool=solo", f"--queues={MAINTENANCE_QUEUE},{node_queue(settings.node_name)}",
                  f"--hostname={hostname}", f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
                  "--task-events"]
        )
    finally:
        stop.set()
        sweeper.stop()
        if peer_server is not None:
            peer_server.stop()
            try:
                nodes.withdraw_peer(settings.node_name)
            except redis.RedisError:
                pass
    return 0
