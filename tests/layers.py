"""The test suite in four layers. Every test module is listed in exactly one; a module in none is a collection error.

    unit      nothing but Python and a private `redis-server` (or another non-Python tool: promtool, kubectl, git)
    pipeline  also real diffusers pipelines, built in this process
    fleet     real fleets: worker processes, the CLI in a subprocess, beat, Flower
    fault     reliability and fault tests: kill -9, recycles, time limits, Redis restarts, Sentinel, full disks

`./fleet test --fast` runs the first two (a contributor's loop, about a minute and a half); `./fleet test` runs all four.
The rule of the fast layers is enforced while their tests run (tests/conftest.py): starting a Python process from a
unit or pipeline test, or from a fixture it uses, raises `LayerError` naming the module and the layer to move it to.

The whole suite runs in three processes (`-n 3 --dist loadfile`): a module's tests stay in one process, the modules run
slowest layer first and, within a layer, in the order listed here (so the longest are listed first). The modules of
SHARED_FLEET only read the fleet they are given and share one per process (tests/conftest.py: `shared_fleet`).
"""

from __future__ import annotations

UNIT = "unit"
PIPELINE = "pipeline"
FLEET = "fleet"
FAULT = "fault"
FAST = (UNIT, PIPELINE)
ORDER = (UNIT, PIPELINE, FLEET, FAULT)

LAYERS: dict[str, tuple[str, ...]] = {
    UNIT: (
        "test_alarms", "test_archive_contract", "test_audit", "test_boot_verify", "test_celery_records",
        "test_deployment_files", "test_diff_sync", "test_lock", "test_manifest", "test_manifest_format", "test_names",
        "test_orphans", "test_ossserver_archive", "test_peers_security", "test_piece_hashing", "test_queue_moves",
        "test_requests", "test_retention", "test_routing_unit", "test_settings", "test_store", "test_verify_trust",
        "test_layers", "test_ossserver", "test_ossserver_link", "test_archive_proxy", "test_deployment_k8s",
        "test_deployment_images", "test_deployment_compose", "test_upstream", "test_deployment_validators",
        "test_route_history", "test_stranded_unit",
        "test_peers_spread", "test_jobstats_unit", "test_canary_unit", "test_roles", "test_registry_scale",
        "test_layers_probe",  # tests/test_layers.py's own probe suite (made at run time, not a file here)
    ),
    PIPELINE: (  # the longest first
        "test_bad_input", "test_demo_trained", "test_models", "test_adapters", "test_standard_configs",
        "test_reference_data", "test_upstream_load", "test_vae_component", "test_variant_sync", "test_layout",
    ),
    FLEET: (  # the longest first (the three SHARED_FLEET modules run as one unit, where test_fleet stands)
        "test_fleet", "test_observability", "test_review_fleet",
        "test_security", "test_fleet_oss", "test_routing_fleet", "test_demo_fleet", "test_batching", "test_live_lora",
        "test_main_job", "test_stranding_fleet", "test_real_models", "test_api_fleet", "test_gpu_ops",
        "test_canary_fleet", "test_beat", "test_tls_fleet", "test_localfleet_auth", "test_sync_while_serving",
        "test_peers_fleet", "test_peers_live", "test_retention_fleet", "test_fleetwide", "test_deployment_health",
        "test_layers_probe_fleet",  # tests/test_layers.py's own probe suite (made at run time, not a file here)
    ),
    FAULT: (  # the longest first
        "test_localfleet_restart", "test_reliability", "test_reliability_cache", "test_reliability_boot",
        "test_sentinel", "test_reliability_prod", "test_reliability_outbox", "test_gpu_faults", "test_time_limits",
        "test_bounded_memory", "test_peers_faults", "test_routing_failover", "test_reliability_redis",
        "test_reliability_disk", "test_reliability_lease",
        "test_deployment_redis",  # the Kubernetes Sentinel set's scripts: start, fail over, take the old primary back
        "test_netns_partitions",
    ),
}


SHARED_FLEET = ("test_fleet", "test_observability", "test_review_fleet")
"""Modules that only read their fleet (two warm workers, one per demo release, the newer routed) and leave its route as
they found it: one work unit of the scheduler, one fleet per process. A module that changes routes, restarts a worker
or needs other settings starts its own."""


def layer_of(module: str) -> str | None:
    """The layer of a test module (its file name without `.py`), or None when it is in no layer."""
    found = [layer for layer, modules in LAYERS.items() if module in modules]
    if len(found) > 1:
        raise ValueError(f"tests/{module}.py is listed in {' and '.join(found)}: list it in one layer")
    return found[0] if found else None


def schedule_rank(module: str) -> tuple[int, int]:
    """Where a module runs in the whole suite: slowest layer first, then in its layer's listed order."""
    layer = layer_of(module)
    if layer is None:
        return (len(ORDER), 0)
    return (list(reversed(ORDER)).index(layer), LAYERS[layer].index(module))


def work_unit_of(module: str, default: str) -> str:
    """The scheduler's work unit of a module: the shared fleet's modules are one, every other module its own."""
    return "shared-fleet" if module in SHARED_FLEET else default
