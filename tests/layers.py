"""The test suite in four layers. Every test module is listed in exactly one; a module in none is a collection error.

    unit      nothing but Python and a private `redis-server` (or another non-Python tool: promtool, kubectl, git)
    pipeline  also real diffusers pipelines, built in this process
    fleet     real fleets: worker processes, the CLI in a subprocess, beat, Flower
    fault     reliability and fault tests: kill -9, recycles, time limits, Redis restarts, Sentinel, full disks

`./fleet test --fast` runs the first two (a contributor's loop, about a minute and a half); `./fleet test` runs all four.
The rule of the fast layers is enforced while their tests run (tests/conftest.py): starting a Python process from a
unit or pipeline test, or from a fixture it uses, raises `LayerError` naming the module and the layer to move it to.
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
    PIPELINE: (
        "test_adapters", "test_demo_trained", "test_models", "test_reference_data", "test_standard_configs",
        "test_upstream_load", "test_vae_component", "test_variant_sync", "test_bad_input", "test_layout",
    ),
    FLEET: (
        "test_batching", "test_beat", "test_demo_fleet", "test_deployment_health", "test_fleet", "test_fleet_oss",
        "test_fleetwide", "test_live_lora", "test_localfleet_auth", "test_main_job", "test_observability",
        "test_peers_fleet", "test_peers_live", "test_real_models", "test_retention_fleet", "test_routing_fleet",
        "test_security", "test_sync_while_serving", "test_gpu_ops", "test_stranding_fleet", "test_canary_fleet",
        "test_review_fleet",
        "test_api_fleet", "test_tls_fleet",
        "test_layers_probe_fleet",  # tests/test_layers.py's own probe suite (made at run time, not a file here)
    ),
    FAULT: (
        "test_bounded_memory", "test_gpu_faults", "test_reliability", "test_reliability_boot", "test_reliability_cache",
        "test_reliability_disk", "test_reliability_lease", "test_reliability_outbox", "test_reliability_prod",
        "test_reliability_redis", "test_routing_failover", "test_sentinel", "test_time_limits",
        "test_localfleet_restart",
        "test_deployment_redis",  # the Kubernetes Sentinel set's scripts: start, fail over, take the old primary back
        "test_peers_faults", "test_netns_partitions",
    ),
}


def layer_of(module: str) -> str | None:
    """The layer of a test module (its file name without `.py`), or None when it is in no layer."""
    found = [layer for layer, modules in LAYERS.items() if module in modules]
    if len(found) > 1:
        raise ValueError(f"tests/{module}.py is listed in {' and '.join(found)}: list it in one layer")
    return found[0] if found else None
