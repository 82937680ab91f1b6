"""Real parts for tests: a private redis-server and real worker processes. Nothing here is a mock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fleetctl.localfleet import alive, free_port, wait_port
from tasks.settings import FleetSettings, offline_environment

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RedisServer:
    """A redis-server of our own on a free loopback port; tests may restart or kill it, never another."""

    dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    appendonly: bool = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server must be installed (apt-get install redis-server)"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_port(self.port)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class WorkerProc:
    name: str
    releases: list[str]
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def child_env(settings: FleetSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings.child_env())
    offline_environment(env)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_worker(settings: FleetSettings, releases: list[str], name: str, logdir: Path, wait: bool = True,
                 timeout: float = 120, **env: str) -> WorkerProc:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    from .fault_worker import FAULT_ENVS

    entry = "tests.fault_worker" if any(k in env for k in FAULT_ENVS) else "fleetctl.cli"  # a poisoned worker: the fault is wrapped in
    argv = [sys.executable, "-m", entry, "worker", "--name", name]
    for r in releases:
        argv += ["--release", r]
    proc = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env(settings, **env), cwd=REPO, start_new_session=True)
    worker = WorkerProc(name, releases, proc, log)
    if wait:
        wait_warm(settings, worker, timeout)
    return worker


def wait_warm(settings: FleetSettings, worker: WorkerProc, timeout: float = 120) -> None:
    from fleetstate.registry import WarmRegistry

    registry = WarmRegistry(settings.state_client())
    deadline = time.monotonic() + timeout
    full = f"{worker.name}@{settings.node_name}"
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker {worker.name} exited ({worker.proc.returncode}):\n{worker.log_text()[-3000:]}")
        warm = registry.warm_workers()
        if all(full in warm.get(r, []) for r in worker.releases):
            # warm is announced just before the consumer starts; wait for Celery to say it is ready
            if "ready." in worker.log_text():
                return
        time.sleep(0.1)
    raise AssertionError(f"worker {worker.name} not warm after {timeout}s:\n{worker.log_text()[-3000:]}")


def no_process_left(pids: list[int]) -> list[int]:
    return [p for p in pids if alive(p)]


def run_cli(settings: FleetSettings, *args: str, env: dict[str, str] | None = None):  # noqa: ANN201 - click's Result
    """The CLI in this process (click's runner), pointed at a test fleet's broker and home (and `env`'s settings)."""
    from click.testing import CliRunner

    from fleetctl.cli import main as cli

    return CliRunner().invoke(cli, list(args), env={"FLEET_BROKER_URL": settings.broker_url,
                                                    "FLEET_HOME": str(settings.home), **(env or {})})
