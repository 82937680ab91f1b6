"""A Redis Sentinel deployment of our own on loopback for tests and the chaos bench: a primary, one replica and
three sentinels (`redis-server --sentinel` with a config file), free ports, a temp folder. Nothing here is a mock."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fleetctl.localfleet import free_port, wait_port

MASTER = "mymaster"
WRITE_GUARD = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")
"""What closes the failover window: a demoted primary that is still alive refuses writes once its replica leaves."""


@dataclass
class SentinelSet:
    dir: Path
    master: str = MASTER
    data_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    data_procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    data_argv: dict[int, list[str]] = field(default_factory=dict)
    write_guard: list[str] = field(default_factory=lambda: list(WRITE_GUARD))
    """Data-server options; the default refuses writes without an in-sync replica (docs/reliability.md)."""
    host: str = "127.0.0.1"
    """The address the servers announce and clients dial (a lab member's, tests/netns.py); loopback is bound too."""

    @property
    def binds(self) -> list[str]:
        return [self.host] if self.host == "127.0.0.1" else [self.host, "127.0.0.1"]

    @property
    def open_argv(self) -> list[str]:
        """Off loopback there is no password: let the lab's private LAN in."""
        return [] if self.host == "127.0.0.1" else ["--protected-mode", "no"]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://{self.host}:{p}" for p in self.sentinel_ports) + "/0"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60) -> SentinelSet:
        exe = shutil.which("redis-server")
        assert exe, "redis-server must be installed (apt-get install redis-server)"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_ports = [free_port(), free_port()]
        primary = self.data_ports[0]
        for i, port in enumerate(self.data_ports):
            folder = self.dir / f"data{i}"
            folder.mkdir(exist_ok=True)
            argv = [exe, "--port", str(port), "--bind", *self.binds, *self.open_argv, "--dir", str(folder), "--save",
                    "", "--appendonly", "yes", "--appendfsync", "always", *self.write_guard]
            self.data_argv[port] = list(argv)
            if i:
                argv += ["--replicaof", self.host, str(primary)]
            self.data_procs[port] = self._spawn(f"data{i}", argv)
            wait_port(port)
        self.sentinel_ports = [free_port() for _ in range(3)]
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(f"port {port}\nbind {' '.join(self.binds)}\ndir {self.dir}\n"
                            + ("" if self.host == "127.0.0.1" else "protected-mode no\n")
                            + f"sentinel monitor {self.master} {self.host} {primary} 2\n"
                            f"sentinel down-after-milliseconds {self.master} 1000\n"
                            f"sentinel failover-timeout {self.master} 15000\n"
                            f"sentinel parallel-syncs {self.master} 1\n")
            self._spawn(f"sentinel{i}", [exe, str(conf), "--sentinel"])
            wait_port(port)
        self.wait_ready(timeout)
        return self

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[i], decode_responses=True)

    def primary_port(self) -> int:
        return int(self.sentinel().sentinel_get_master_addr_by_name(self.master)[1])

    def wait_ready(self, timeout: float = 60) -> None:
        """Every sentinel sees the primary and its replica, and the replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = all(
                    len(self.sentinel(i).sentinel_slaves(self.master)) == 1
                    and int(self.sentinel(i).sentinel_master(self.master).get("num-other-sentinels", 0)) == 2
                    for i in range(3))
                replica = [p for p in self.data_ports if p != self.primary_port()][0]
                info = redis.Redis(port=replica).info("replication")
                if ready and info.get("master_link_status") == "up":
                    return
            except (redis.RedisError, IndexError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"sentinel set not ready after {timeout}s (see {self.dir})")

    def failover(self, timeout: float = 120) -> tuple[int, int]:
        """SENTINEL FAILOVER: the replica becomes primary; returns (old, new) primary ports once all agree. On a
        loaded machine a failover can abort (the replica slow to confirm its promotion): it is asked for again."""
        old = self.primary_port()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.sentinel().execute_command("SENTINEL", "FAILOVER", self.master)
            except redis.ResponseError as exc:  # refused while the last one settles (INPROG, NOGOODSLAVE)
                if not str(exc).startswith(("INPROG", "NOGOODSLAVE")):
                    raise
                time.sleep(0.5)
                continue
            attempt_ends = min(deadline, time.monotonic() + 30)
            while time.monotonic() < attempt_ends:
                ports = {int(self.sentinel(i).sentinel_get_master_addr_by_name(self.master)[1]) for i in range(3)}
                if len(ports) == 1 and old not in ports:
                    new = ports.pop()
                    if redis.Redis(port=new).info("replication")["role"] == "master":
                        return old, new
                time.sleep(0.1)
        raise AssertionError("failover did not complete")

    def restart_data(self, port: int) -> None:
        """Stop one data server (SIGTERM: its append-only file is fsynced on every write) and start it again on its
        port, as a replica of the primary the sentinels name unless it is that primary itself."""
        primary = self.primary_port()
        proc = self.data_procs[port]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        argv = list(self.data_argv[port])
        if port != primary:
            argv += ["--replicaof", self.host, str(primary)]
        self.data_procs[port] = self._spawn(f"data{self.data_ports.index(port)}", argv)
        wait_port(port)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
