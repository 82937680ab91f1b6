"""The compose fleet: persistent, password-protected Redis, one beat, Flower behind auth, a warm worker per release
on a shared L2 (gpu profile), the demo without a GPU (cpu profile); and beat, Flower and the maintenance worker run
in compose and Kubernetes as `warmfleet up` runs them in the local fleet.

No container engine runs here, so nothing is built or started: the files are read (tests/deployment_files.py) and
what they name is checked against the project.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES
from tasks.settings import FleetSettings

from .deployment_files import (
    COMPOSE,
    ENV_EXAMPLE,
    K8S,
    L2_PATH,
    REDIS_ENV_EXAMPLE,
    argv_of,
    commands_in,
    compose,
    compose_role,
    env_keys,
    option_names,
    segments,
    services,
    yaml_docs,
)

SPAWN_ENV: dict[str, dict[str, str]] = {}
"""The environment `warmfleet up` gave each process in the last local_fleet_argv call."""


def local_fleet_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The argv `warmfleet up` gives each process, read from fleetctl/localfleet.py by recording its spawns."""
    from fleetctl import localfleet
    from fleetctl.localfleet import LocalFleet, Proc

    spawned: dict[str, list[str]] = {}

    def spawn(self: LocalFleet, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        spawned[name] = [Path(argv[0]).name, *argv[1:]]
        SPAWN_ENV[name] = dict(env)
        return Proc(name, 0, "")

    monkeypatch.setattr(LocalFleet, "_spawn", spawn)
    monkeypatch.setattr(LocalFleet, "_prepare_models", lambda self, releases: None)
    monkeypatch.setattr(LocalFleet, "_route", lambda self, url, releases, active: None)
    monkeypatch.setattr(LocalFleet, "_wait_warm", lambda self, state, releases, timeout: None)
    monkeypatch.setattr(localfleet, "wait_port", lambda port, timeout=15.0: None)
    monkeypatch.setattr(localfleet, "wait_redis", lambda *args, **kwargs: None)
    # nothing was started: a failing `up` must not signal the recorded pids (0 would be this test's process group)
    monkeypatch.setattr(LocalFleet, "down", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(localfleet.shutil, "which", lambda name: f"/usr/bin/{name}")
    settings = FleetSettings(home=tmp_path, flower_password="secret")
    LocalFleet(settings, log=lambda *_: None).up(list(DEMO_RELEASES), None)
    return {name: (argv[2:] if argv[1:2] == ["-m"] else argv) for name, argv in spawned.items()}


def _program(argv: list[str]) -> list[str]:
    """What runs, without its options: `celery -A tasks.app beat`, `warmfleet maintenance-worker`."""
    return argv[:4] if argv[0] == "celery" else argv[:2]


def test_compose_and_k8s_run_beat_flower_and_maintenance_as_the_local_fleet_does(tmp_path, monkeypatch):
    local = local_fleet_argv(tmp_path, monkeypatch)
    assert local["beat"][:4] == ["celery", "-A", "tasks.app", "beat"]
    k8s = {d["metadata"]["name"]: next(commands_in(d["spec"]["template"]["spec"]["containers"]))
           for p in (K8S / "base").glob("*.yaml") for d in yaml_docs(p) if d.get("kind") in ("Deployment", "DaemonSet")}
    svc = compose()["services"]
    pairs = [("beat", argv_of(svc["beat"]["command"])), ("beat", k8s["beat"]),
             ("flower", argv_of(svc["flower"]["command"])), ("flower", k8s["flower"]),
             ("maintenance", argv_of(svc["maintenance"]["command"])), ("maintenance", k8s["maintenance"])]
    for name, argv in pairs:
        ours = local[name]
        if ours[0] == "fleetctl.cli":
            ours = ["warmfleet", *ours[1:]]
        assert _program(argv) == _program(ours), (name, argv, ours)
        assert set(option_names(argv)) <= set(option_names(ours)), (name, argv, ours)
    assert set(option_names(svc["beat"]["command"])) == set(option_names(local["beat"]))
    # the local fleet and the deployments turn Flower's auth on the same way: through Flower's FLOWER_BASIC_AUTH
    # environment (built from FLEET_FLOWER_PASSWORD), never a password on the command line where `ps` shows it
    assert "--basic-auth" not in option_names(local["flower"])
    assert SPAWN_ENV["flower"]["FLOWER_BASIC_AUTH"] == "admin:secret"
    assert "${FLEET_FLOWER_PASSWORD:?" in svc["flower"]["environment"]["FLOWER_BASIC_AUTH"]


def test_compose_redis_is_persistent_and_password_protected():
    svc = compose()["services"]
    redis = svc["redis"]
    argv = argv_of(redis["command"])
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    # the users, the default (admin) one with REDIS_PASSWORD, are the `user` lines of the config file the one-shot
    # redis-users writes before Redis starts (redis-server's first argument)
    assert "--requirepass" not in argv and "--aclfile" not in argv
    aclfile = argv[1]
    [acl_mount] = [v for v in redis["volumes"] if v.endswith(":ro") and aclfile.startswith(v.split(":")[1] + "/")]
    volume = acl_mount.split(":")[0]
    assert redis["depends_on"]["redis-users"]["condition"] == "service_completed_successfully"
    users = svc["redis-users"]
    [(written_to)] = [v.split(":")[1] for v in users["volumes"] if v.split(":")[0] == volume]
    script = " ".join(argv_of(users["command"]))
    target = f"{written_to}/{Path(aclfile).name}"
    assert "warmfleet roles config" in script and f"mv {target}.new {target}" in script
    assert re.search(r'echo "user default on >\$\$\{REDIS_ADMIN_PASSWORD\} ~\* &\* \+@all"', script), script
    assert users["environment"]["REDIS_ADMIN_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    # only Redis, its healthcheck and redis-users know the admin password; only those two mount the ACL file
    for name, s in svc.items():
        if name not in ("redis", "redis-users"):
            assert "REDIS_PASSWORD:" not in yaml.safe_dump(s), name
            assert not any(str(v).split(":")[0] == volume for v in s.get("volumes", [])), name


def test_compose_redis_users_get_every_role_of_fleetstate_acl_from_its_own_variable():
    from fleetctl.cli.roles import PASSWORD_ENV
    from fleetstate.acl import ROLES

    env = compose()["services"]["redis-users"]["environment"]
    given = {k: v for k, v in env.items() if k != "REDIS_ADMIN_PASSWORD"}
    assert set(given) == {PASSWORD_ENV.format(role=r.upper()) for r in ROLES}
    for role in ROLES:
        assert given[PASSWORD_ENV.format(role=role.upper())].startswith(f"${{REDIS_{role.upper()}_PASSWORD:?")


# each compose service's role: as fleetstate.acl.PROCESS_ROLES gives the local fleet's processes
COMPOSE_ROLES = {
    "beat": "maintenance", "maintenance": "maintenance", "demo-maintenance": "maintenance",
    "publish-demo": "maintenance", "flower": "operator", "demo-route": "operator", "exporter": "monitoring",
    "api": "producer", "worker-blue": "worker", "worker-green": "worker", "demo-worker-blue": "worker",
    "demo-worker-green": "worker",
}


def test_compose_gives_each_service_only_its_roles_redis_user_and_password():
    from fleetstate.acl import PROCESS_ROLES, ROLES

    svc = compose()["services"]
    roles = {name: compose_role(s) for name, s in svc.items()}
    assert {n: r for n, r in roles.items() if r} == COMPOSE_ROLES
    assert set(COMPOSE_ROLES.values()) == set(ROLES)
    # the same role as the local fleet's process of that kind
    for name, process in (("beat", "beat"), ("maintenance", "maintenance"), ("flower", "flower"),
                          ("exporter", "metrics"), ("api", "api"), ("worker-blue", "worker")):
        assert COMPOSE_ROLES[name] == PROCESS_ROLES[process], name
    # no service names another role's password: only its own URL's
    for name, s in svc.items():
        text = yaml.safe_dump(s)
        named = set(re.findall(r"REDIS_([A-Z]+)_PASSWORD", text))
        if name == "redis-users":
            assert named == {r.upper() for r in ROLES} | {"ADMIN"}
        else:
            assert named <= ({roles[name].upper()} if roles[name] else set()), (name, named)
    # the containers given docker/fleet.env whole get no Redis password from it
    assert not {k for k in env_keys(ENV_EXAMPLE) if k.startswith("REDIS_") and k.endswith("PASSWORD")}


def test_compose_and_the_local_fleet_log_each_process_in_as_the_same_user(tmp_path, monkeypatch):
    from fleetstate.acl import url_role

    local_fleet_argv(tmp_path, monkeypatch)
    for compose_name, local_name in (("beat", "beat"), ("flower", "flower"), ("maintenance", "maintenance"),
                                     ("exporter", "metrics"), ("api", "api")):
        if local_name not in SPAWN_ENV:
            continue
        assert url_role(SPAWN_ENV[local_name].get("FLEET_BROKER_URL")) == COMPOSE_ROLES[compose_name], local_name
    workers = [n for n in SPAWN_ENV if n.startswith("worker")]
    assert workers and all(url_role(SPAWN_ENV[n]["FLEET_BROKER_URL"]) == "worker" for n in workers)


def test_compose_tls_is_one_scheme_and_query_for_every_url():
    svc = compose()["services"]
    urls = [s["environment"]["FLEET_BROKER_URL"] for s in svc.values() if "FLEET_BROKER_URL" in s.get("environment", {})]
    assert urls and all(u.startswith("${REDIS_SCHEME:-redis}://") and u.endswith("/0${REDIS_URL_QUERY:-}") for u in urls)
    text = REDIS_ENV_EXAMPLE.read_text()
    assert "# REDIS_SCHEME=rediss" in text and "ssl_cert_reqs=required&ssl_ca_certs=" in text


def test_compose_runs_one_beat_and_flower_behind_auth():
    always = services(None)
    beats = [n for n, s in compose()["services"].items() if "beat" in argv_of(s.get("command", []))]
    assert beats == ["beat"] and "beat" in always
    assert "scale" not in always["beat"] and "replicas" not in always["beat"].get("deploy", {})
    flower = always["flower"]
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"]


def test_compose_gpu_profile_runs_a_warm_worker_per_release_on_a_shared_l2():
    gpu = services("gpu")
    workers = {n: s for n, s in gpu.items() if argv_of(s.get("command", []))[:2] == ["warmfleet", "worker"]}
    assert sorted(workers) == ["worker-blue", "worker-green"]
    releases = {argv_of(s["command"])[-1] for s in workers.values()}
    assert releases == {"${BLUE_RELEASE:?set BLUE_RELEASE in docker/fleet.env}",
                        "${GREEN_RELEASE:?set GREEN_RELEASE in docker/fleet.env}"}
    gpus = set()
    for s in workers.values():
        [device] = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        gpus.add(tuple(device["device_ids"]))
        assert s["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert "fleet.env" in s["env_file"]
        assert_health_checks_its_own_worker(s)
    assert len(gpus) == 2, "each worker has its own GPU"
    for name in [*workers, "maintenance"]:
        assert f"l2:{L2_PATH}" in gpu[name]["volumes"], name
    assert "l2" in compose()["volumes"]
    assert compose()["x-fleet-env"]["FLEET_CACHE_ROOT"] == L2_PATH
    # one name per node: its workers are blue@<node>, green@<node>, and its L2 gets its own maintenance queue
    assert compose()["x-fleet-env"]["FLEET_NODE_NAME"].startswith("${NODE_NAME:?")


def assert_health_checks_its_own_worker(service: dict[str, Any]) -> None:
    """The node's workers share FLEET_NODE_NAME, so each container checks its own worker by name."""
    argv = argv_of(service["command"])
    name = argv[argv.index("--name") + 1]
    assert service["healthcheck"]["test"] == ["CMD", "warmfleet", "health", "--worker", name]


def test_compose_cpu_profile_runs_the_demo_without_a_gpu():
    cpu = services("cpu")
    assert not any("deploy" in s for s in cpu.values()), "no GPU reservation in the cpu profile"
    assert not any(s["build"]["dockerfile"].endswith(".gpu") for s in cpu.values() if "build" in s)
    init = cpu["publish-demo"]
    assert argv_of(init["command"]) == ["warmfleet", "publish-demo"] and init["restart"] == "no"
    workers = {n: s for n, s in cpu.items() if argv_of(s.get("command", []))[:2] == ["warmfleet", "worker"]}
    assert sorted(argv_of(s["command"])[-1] for s in workers.values()) == sorted(DEMO_RELEASES)
    for s in workers.values():
        assert s["depends_on"]["publish-demo"]["condition"] == "service_completed_successfully"
        assert s["environment"]["FLEET_ARCHIVE_URL"].startswith("file:///")
        assert s["environment"]["FLEET_ARCHIVE_URL"] == init["environment"]["FLEET_ARCHIVE_URL"]
        assert_health_checks_its_own_worker(s)
    # the first route: the older demo release, then the newer, so the older is the previous one
    script = argv_of(cpu["demo-route"]["command"])[2]
    calls = [seg[seg.index("warmfleet") + 1:] for seg in segments(["sh", "-c", script]) if "warmfleet" in seg]
    assert [c[1:] for c in calls if c[0] == "promote"] == [[DEMO_MODEL, r] for r in DEMO_RELEASES]


def test_fleet_env_example_defines_what_compose_requires():
    keys = env_keys(ENV_EXAMPLE)
    redis_keys = env_keys(REDIS_ENV_EXAMPLE)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k in keys | redis_keys), keys | redis_keys
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    assert required and required <= keys | redis_keys, required - keys - redis_keys
    for key in ("FLEET_ARCHIVE_URL", "FLEET_OSS_ENDPOINT", "FLEET_OSS_ACCESS_KEY_ID", "FLEET_OSS_ACCESS_KEY_SECRET",
                "REDIS_ADDRESS", "FLEET_FLOWER_USER"):
        assert key in keys, key
    # the Redis passwords: in redis.env only (fleet.env is given whole to the workers)
    assert redis_keys == {"REDIS_PASSWORD"} | {f"REDIS_{r.upper()}_PASSWORD" for r in COMPOSE_ROLES.values()}
    assert not keys & redis_keys


def test_compose_runs_the_exporter_prometheus_with_the_rules_and_grafana_with_the_dashboard():
    svc = services(None)
    exporter = svc["exporter"]
    argv = argv_of(exporter["command"])
    assert argv[:2] == ["warmfleet", "metrics"]
    port = argv[argv.index("--port") + 1]
    assert exporter["environment"]["FLEET_METRICS_ADDRESS"] == "0.0.0.0"
    assert any(p.endswith(f":{port}:{port}") for p in exporter["ports"])
    # Prometheus reads docker/prometheus/ (mounted read-only): its config scrapes the exporter and loads rules.yml
    prometheus = svc["prometheus"]
    [config_arg] = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    config_path = config_arg.split("=", 1)[1]
    [mount] = [v for v in prometheus["volumes"] if v.startswith("./prometheus:")]
    source, target, mode = mount.split(":")
    assert mode == "ro" and config_path.startswith(target + "/")
    config = yaml.safe_load((COMPOSE.parent / source / Path(config_path).relative_to(target)).read_text())
    assert config["rule_files"] == ["rules.yml"] and (COMPOSE.parent / source / "rules.yml").is_file()
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"exporter:{port}"]}]
    # Grafana: the data source is that Prometheus, the dashboard file is where the provider looks, a password is required
    grafana = svc["grafana"]
    provisioning = grafana["environment"]["GF_PATHS_PROVISIONING"]
    [prov_mount] = [v for v in grafana["volumes"] if v.endswith(f":{provisioning}:ro")]
    prov_dir = COMPOSE.parent / prov_mount.split(":")[0]
    [datasource] = yaml.safe_load((prov_dir / "datasources/prometheus.yml").read_text())["datasources"]
    web = [a for a in prometheus["command"] if a.startswith("--web.listen-address=")][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{web}" and datasource["type"] == "prometheus"
    [provider] = yaml.safe_load((prov_dir / "dashboards/warmfleet.yml").read_text())["providers"]
    [dash_mount] = [v for v in grafana["volumes"] if v.startswith("./grafana/warmfleet.json:")]
    assert str(Path(dash_mount.split(":")[1]).parent) == provider["options"]["path"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_compose_gives_each_role_only_what_it_uses_and_hardens_every_fleet_container():
    svc = compose()["services"]
    for name in ("beat", "flower", "exporter", "redis-users"):
        assert "env_file" not in svc[name], f"{name} needs the broker only, not docker/fleet.env"
    for name in ("maintenance", "worker-blue", "worker-green"):
        assert "fleet.env" in svc[name]["env_file"], name
    for name, s in svc.items():
        if name == "redis":
            continue  # the Redis image starts as root to hand /data to its user, then drops to it
        assert s.get("read_only") is True, name
        assert s.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in s.get("security_opt", []), name
        assert "/tmp" in s.get("tmpfs", []), name
        # a read-only root: whatever the process writes is a volume or a tmpfs
        targets = {v.split(":")[1] for v in s.get("volumes", [])} | set(s.get("tmpfs", []))
        if argv_of(s.get("command", []))[:1] in (["warmfleet"], ["celery"]) and name != "flower":
            assert "/var/lib/warmfleet" in targets, f"{name}: FLEET_HOME is not writable"
    assert "no-new-privileges:true" in svc["redis"]["security_opt"]
