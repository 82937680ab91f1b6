"""Least privilege: the fleet's roles as ACL users on a real redis-server (fleetstate/acl.py).

The producer sends a real `generate` through Celery and kombu (the outbox script included) and reads a result, and
is refused (NOPERM) everything else: route, lease, registry and pin writes, reading queued messages, FLUSHALL,
CONFIG, KEYS. The other roles are checked for what sets them apart; tests/test_api_fleet.py runs a whole fleet in
which every process uses its own role."""

from __future__ import annotations

import json

import pytest
import redis
from click.testing import CliRunner

from cachemgr.names import queue_for
from fleetstate import acl
from fleetstate.keys import CELERY_META_KEY, LEASE_KEY, OUTBOX_KEY, PIN_KEY, ROUTE_KEY, WARM_KEY
from fleetstate.routes import RouteTable

from .support import RedisServer, fleet_settings_for

RELEASE = "nano-banana@base-v1.0.0+lora-v1.0.0"
OTHER = "nano-banana@base-v1.1.0+lora-v1.0.0"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = RedisServer(tmp_path_factory.mktemp("acl-redis"), appendonly=False).start()
    admin = srv.client()
    urls = {role: acl.role_url(srv.url, role, pw) for role, pw in (lambda p: (acl.apply_roles(admin, p), p)[1])(
        acl.new_passwords()).items()}
    RouteTable(admin).set_active(RELEASE, actor="test", reason="setup")
    try:
        yield srv, admin, urls
    finally:
        srv.stop()


def as_role(urls: dict[str, str], role: str) -> redis.Redis:
    return redis.Redis.from_url(urls[role])


@pytest.fixture(scope="module")
def producer_app(server, tmp_path_factory: pytest.TempPathFactory):
    import tasks

    _, _, urls = server
    settings = fleet_settings_for(tmp_path_factory.mktemp("home"), urls["producer"])
    app = tasks.configure(settings)
    yield app


def test_a_producer_sends_generate_through_celery_and_the_outbox(server, producer_app):
    import tasks

    _, admin, _ = server
    before = admin.llen(queue_for(RELEASE))
    result = tasks.generate.delay("a red circle", steps=2)
    assert admin.llen(queue_for(RELEASE)) == before + 1
    assert any(json.loads(v)["task_id"] == result.id for v in admin.hvals(OUTBOX_KEY))
    assert result.state == "PENDING"  # its result key is readable (not there yet)
    meta = {"status": "SUCCESS", "result": {"image_uri": "file:///x.png"}, "traceback": None, "children": [],
            "date_done": None, "task_id": result.id}
    admin.set(CELERY_META_KEY.format(task_id=result.id), json.dumps(meta))
    assert result.get(timeout=10) == {"image_uri": "file:///x.png"}
    assert not admin.execute_command("ACL", "LOG"), "a producer's send or result read was refused"


def test_a_producer_may_send_to_an_explicit_release(server, producer_app):
    import tasks

    _, admin, _ = server
    admin.sadd("fleet:catalog:nano-banana", "base/v1.1.0", "lora/v1.0.0")
    result = tasks.generate.delay("a blue square", release=OTHER)
    assert result.id in admin.lrange(queue_for(OTHER), 0, -1)[0].decode()


@pytest.mark.parametrize("what", [
    lambda c: RouteTable(c).set_active(OTHER, actor="intruder", reason="x"),
    lambda c: c.hset(ROUTE_KEY.format(model="nano-banana"), "active", OTHER),
    lambda c: c.set(LEASE_KEY.format(task_id="t1"), "me", px=10000),
    lambda c: c.hset(WARM_KEY.format(release=OTHER, worker="fake@w"), "at", 1),
    lambda c: c.sadd(PIN_KEY, "base/v9"),
    lambda c: c.lrange(queue_for(RELEASE), 0, -1),  # another producer's queued prompts
    lambda c: c.delete(queue_for(RELEASE)),
    lambda c: c.flushall(),
    lambda c: c.config_get("*"),
    lambda c: c.keys("*"),
    lambda c: c.execute_command("ACL", "LIST"),
], ids=["promote", "route-hset", "lease", "registry", "pin", "read-queue", "drop-queue", "flushall", "config", "keys",
        "acl"])
def test_a_producer_is_refused_everything_else(server, what):
    _, _, urls = server
    with pytest.raises(redis.exceptions.NoPermissionError):
        what(as_role(urls, "producer"))


def test_a_refusal_reads_as_one_line_naming_the_role(server):
    _, _, urls = server
    with pytest.raises(redis.exceptions.NoPermissionError) as caught:
        as_role(urls, "producer").flushall()
    line = acl.denied_message(caught.value, urls["producer"])
    assert line and "\n" not in line and "producer role" in line


def test_the_cli_refuses_a_producer_a_promote_in_one_line(server, monkeypatch: pytest.MonkeyPatch, tmp_path):
    from fleetctl.cli import main

    _, admin, urls = server
    monkeypatch.setenv("FLEET_HOME", str(tmp_path))
    out = CliRunner().invoke(main, ["promote", "nano-banana", OTHER, "--force"], env={"FLEET_BROKER_URL": urls["producer"]})
    assert out.exit_code == 1, out.output
    assert out.output.strip().count("\n") == 0 and "the producer role may not" in out.output, out.output
    assert admin.hget(ROUTE_KEY.format(model="nano-banana"), "active").decode() == RELEASE


def test_the_operator_routes_but_cannot_wipe_the_server(server):
    _, admin, urls = server
    operator = as_role(urls, "operator")
    admin.sadd(PIN_KEY, "probe")
    assert operator.sadd(PIN_KEY, "base/v1.0.0") == 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        operator.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        operator.config_set("requirepass", "x")


def test_workers_and_maintenance_read_routes_and_pins_but_never_write_pins(server):
    """Workers write neither routes nor pins; maintenance writes routes only for beat's canary analysis."""
    _, admin, urls = server
    for role in ("worker", "maintenance"):
        client = as_role(urls, role)
        assert client.hget(ROUTE_KEY.format(model="nano-banana"), "active")
        client.hset(WARM_KEY.format(release=RELEASE, worker=f"{role}@n"), "at", 1)
        client.set(LEASE_KEY.format(task_id=f"{role}-t"), "me", px=1000)
        refused = [lambda c: c.sadd(PIN_KEY, "x"), lambda c: c.flushdb(), lambda c: c.config_get("*")]
        if role == "worker":
            refused.append(lambda c: c.hset(ROUTE_KEY.format(model="nano-banana"), "active", OTHER))
        for write in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                write(client)


def test_monitoring_reads_everything_and_writes_only_alert_states(server):
    _, _, urls = server
    mon = as_role(urls, "monitoring")
    assert mon.hgetall(ROUTE_KEY.format(model="nano-banana"))
    assert mon.lrange(queue_for(RELEASE), 0, -1) is not None
    mon.hset("fleet:alerts", "probe", "{}")
    for write in (lambda c: c.set("fleet:stats", 1), lambda c: c.lpush(queue_for(RELEASE), "x"),
                  lambda c: c.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write(mon)


def test_role_urls_keep_host_scheme_and_database():
    url = acl.role_url("rediss://:admin@10.0.0.1:6380/3?ssl_cert_reqs=required", "producer", "p/w")
    assert url == "rediss://fleet-producer:p%2Fw@10.0.0.1:6380/3?ssl_cert_reqs=required"
    assert acl.url_role(url) == "producer" and acl.url_role("redis://:x@h/0") is None


def test_roles_in_the_local_redis_conf_survive_a_restart(tmp_path):
    import shutil
    import subprocess

    from fleetctl.localfleet import free_port, wait_port
    from fleetctl.localredis import redis_config

    passwords, port = acl.new_passwords(), free_port()
    conf = redis_config(tmp_path, port, "admin-pass", users=acl.config_lines(passwords))
    urls = acl.role_urls(f"redis://:admin-pass@127.0.0.1:{port}/0", passwords)
    for _ in range(2):  # started, then started again from the same configuration and AOF
        proc = subprocess.Popen([shutil.which("redis-server"), str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        try:
            wait_port(port)
            producer = redis.Redis.from_url(urls["producer"])
            assert producer.hgetall(ROUTE_KEY.format(model="m")) == {}
            with pytest.raises(redis.exceptions.NoPermissionError):
                producer.flushall()
            assert redis.Redis.from_url(urls["operator"]).sadd(PIN_KEY, "x") in (0, 1)
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def test_a_local_producer_picks_its_role_from_the_state_file(tmp_path):
    from tasks.settings import FleetSettings

    state = tmp_path / "state" / "fleet.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"broker_url": "redis://:admin@h:1/0",
                                 "roles": {"producer": "redis://fleet-producer:p@h:1/0"}}))
    assert FleetSettings(home=tmp_path).resolved_broker_url == "redis://:admin@h:1/0"
    assert FleetSettings(home=tmp_path, role="producer").resolved_broker_url == "redis://fleet-producer:p@h:1/0"
    assert FleetSettings(home=tmp_path, role="producer", broker_url="redis://x/0").resolved_broker_url == "redis://x/0"


def test_roles_apply_creates_the_users_on_your_own_redis(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from fleetctl.cli import main

    srv = RedisServer(tmp_path / "own", appendonly=False).start()
    try:
        monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
        env = {"FLEET_BROKER_URL": srv.url} | {f"FLEET_{r.upper()}_PASSWORD": f"pw-{r}-0123456789" for r in acl.ROLES}
        missing = CliRunner().invoke(main, ["roles", "apply"], env={"FLEET_BROKER_URL": srv.url})
        assert missing.exit_code == 1 and "FLEET_PRODUCER_PASSWORD" in missing.output
        done = CliRunner().invoke(main, ["roles", "apply"], env=env)
        assert done.exit_code == 0, done.output
        producer = redis.Redis.from_url(acl.role_url(srv.url, "producer", "pw-producer-0123456789"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.set(LEASE_KEY.format(task_id="x"), 1)
        lines = CliRunner().invoke(main, ["roles", "config"], env=env).output.splitlines()
        assert len(lines) == len(acl.ROLES) and all(line.startswith("user fleet-") for line in lines)
    finally:
        srv.stop()
