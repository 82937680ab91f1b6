"""The Redis with Sentinel of docker/k8s/components/redis-sentinel, run here: its two start scripts (redis.sh for each
data server, sentinel.sh for each sentinel) start three real redis-servers and three sentinels on three loopback
addresses, as three pods would. The first start makes pod 0 the primary; the sentinels agree on it; when the primary
dies they promote a replica; pod 0, started again by the same script, asks the sentinels and comes back as a replica of
the new primary, not as a second primary, with the data written before.

Only the pod's addresses differ from a cluster (REDIS_HOSTS instead of the headless Service's DNS names) and the
sentinels' down-after time (1 s instead of 5 s).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from .deployment_files import K8S

SCRIPTS = K8S / "components" / "redis-sentinel"
HOSTS = ["127.0.9.1", "127.0.9.2", "127.0.9.3"]
PASSWORD = "a0b1c2d3e4"
MASTER = "warmfleet"


def free_on_all(hosts: list[str], avoid: set[int]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        if port in avoid:
            continue
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every test address")


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class RedisSet:
    """Three pods' worth of the component: data servers and sentinels started by its scripts."""

    def __init__(self, root: Path) -> None:
        assert shutil.which("redis-server") and shutil.which("redis-cli"), "redis-server and redis-cli are needed"
        self.root = root
        self.port = free_on_all(HOSTS, set())
        self.sport = free_on_all(HOSTS, {self.port})
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, i: int, kind: str) -> dict[str, str]:
        base = self.root / f"redis-{i}"
        (base / "data").mkdir(parents=True, exist_ok=True)
        return {**os.environ, "POD_NAME": f"redis-{i}", "POD_NAMESPACE": "test", "REDIS_PASSWORD": PASSWORD,
                "REDIS_HOSTS": " ".join(HOSTS), "REDIS_BIND": HOSTS[i], "REDIS_PORT": str(self.port),
                "SENTINEL_PORT": str(self.sport), "SENTINEL_DOWN_AFTER_MS": "1000", "MASTER_NAME": MASTER,
                "CONF_DIR": str(base / f"{kind}-conf"), "DATA_DIR": str(base / "data")}

    def start(self, i: int, kind: str) -> None:
        log = open(self.root / f"redis-{i}-{kind}.log", "ab")  # noqa: SIM115 - the child's, closed with it
        self.procs[f"{kind}-{i}"] = subprocess.Popen(["sh", str(SCRIPTS / f"{kind}.sh")], env=self.env(i, kind),
                                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, i: int, kind: str) -> str:
        return (self.root / f"redis-{i}-{kind}.log").read_text()

    def stop(self, key: str) -> None:
        proc = self.procs.pop(key)
        proc.terminate()
        proc.wait(timeout=10)

    def data(self, i: int) -> redis.Redis:
        return redis.Redis(host=HOSTS[i], port=self.port, password=PASSWORD, socket_timeout=2)

    def sentinel(self, i: int) -> redis.Redis:
        return redis.Redis(host=HOSTS[i], port=self.sport, socket_timeout=2, decode_responses=True)

    def primary_says(self, i: int) -> str:
        return self.sentinel(i).execute_command("SENTINEL", "get-master-addr-by-name", MASTER)[0]

    def close(self) -> None:
        for key in list(self.procs):
            self.stop(key)


@pytest.fixture
def redis_set(tmp_path: Path) -> Iterator[RedisSet]:
    try:
        with socket.socket() as s:
            s.bind((HOSTS[2], 0))
    except OSError:
        pytest.fail(f"cannot bind {HOSTS[2]}: the test needs the loopback range 127.0.0.0/8")
    rs = RedisSet(tmp_path)
    try:
        yield rs
    finally:
        rs.close()


def test_the_set_starts_fails_over_and_takes_its_old_primary_back_as_a_replica(redis_set):
    rs = redis_set
    for i in range(3):
        rs.start(i, "redis")
    wait_for("pod 0 as the primary with two replicas",
             lambda: rs.data(0).info("replication")["connected_slaves"] == 2)
    assert "starts as primary" in rs.log(0, "redis")
    assert all(f"replica of {HOSTS[0]}" in rs.log(i, "redis") for i in (1, 2))
    # the data servers run with the settings docs/reliability.md measured
    assert rs.data(0).config_get("min-replicas-to-write")["min-replicas-to-write"] == "1"
    assert rs.data(0).config_get("appendonly")["appendonly"] == "yes"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=HOSTS[0], port=rs.port, socket_timeout=2).set("k", "v")

    for i in range(3):
        rs.start(i, "sentinel")
    for i in range(3):
        wait_for(f"sentinel {i} to know the others",
                 lambda i=i: len(rs.sentinel(i).execute_command("SENTINEL", "sentinels", MASTER)) == 2)
        assert rs.primary_says(i) == HOSTS[0]
    rs.data(0).set("job", "queued before the failover")
    assert rs.data(0).wait(2, 5000) == 2

    rs.stop("redis-0")  # the primary's pod dies
    new = wait_for("a replica promoted", lambda: rs.primary_says(1) if rs.primary_says(1) != HOSTS[0] else None)
    assert new in HOSTS[1:]
    wait_for("every sentinel to agree", lambda: {rs.primary_says(i) for i in range(3)} == {new})

    rs.start(0, "redis")  # the pod comes back: it asks the sentinels before it starts
    wait_for("pod 0 back as a replica of the new primary",  # a full resync: longer on a loaded machine
             lambda: rs.data(0).info("replication")["role"] == "slave"
             and rs.data(0).info("replication")["master_host"] == new
             and rs.data(0).info("replication")["master_link_status"] == "up", timeout=120)
    assert f"replica of {new}" in rs.log(0, "redis").split("redis: ")[-1]
    assert rs.data(0).get("job") == b"queued before the failover"
    new_index = HOSTS.index(new)
    wait_for("the new primary to count both replicas",
             lambda: rs.data(new_index).info("replication")["connected_slaves"] == 2)
