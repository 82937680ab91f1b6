"""What the tests share: settings, a private redis-server, real worker processes and pools of them, waits, and where
the reliability tests leave their numbers. Nothing here is a mock. Test modules import from here (and get fixtures
from conftest.py), never from one another."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from cachemgr.archive import open_archive
from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef
from fleetctl.demo.builders import DEMO_RELEASES
from fleetctl.localfleet import alive, free_port, wait_port
from ossserver import OssServer
from tasks.settings import FleetSettings, offline_environment

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VISIBILITY_TIMEOUT = 10  # the smallest the settings allow: the reliability fleets recover in seconds, not minutes
NEXT = "nano-banana@base-v1.2.0+lora-v2.3.1"  # a base version newer than the demo's, published by the tests that sync it

FLEET_TEST_SETTINGS: dict[str, Any] = {"torch_threads": 1, "heartbeat_seconds": 1.0, "warm_ttl_seconds": 4.0,
                                       "route_cache_ttl": 0.0, "node_name": "testnode"}
"""What every test fleet runs with: one torch thread, heartbeats and warm TTL in seconds, no route cache."""


def fleet_settings_for(home: Path, broker_url: str | None = None, archive: Path | str | None = None,
                       **overrides: Any) -> FleetSettings:
    """A test fleet's settings: `archive` a local folder (its file:// URL) or an archive URL; `overrides` win."""
    values: dict[str, Any] = {"home": home, **FLEET_TEST_SETTINGS}
    if broker_url is not None:
        values["broker_url"] = broker_url
    if archive is not None:
        values["archive_url"] = archive.as_uri() if isinstance(archive, Path) else archive
    return FleetSettings(**(values | overrides))


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
                 timeout: float = 120, entry: str | None = None, **env: str) -> WorkerProc:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    from .fault_worker import FAULT_ENVS

    entry = entry or ("tests.fault_worker" if any(k in env for k in FAULT_ENVS) else "fleetctl.cli")  # a faulty worker: the fault is wrapped in
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


def run_cli(settings: FleetSettings, *args: str, env: dict[str, str] | None = None,  # noqa: ANN201 - click's Result
            input: str | None = None):
    """The CLI in this process (click's runner), pointed at a test fleet's broker, home and archive (and `env`'s
    settings)."""
    from click.testing import CliRunner

    from fleetctl.cli import main as cli

    archive = {"FLEET_ARCHIVE_URL": settings.archive_url} if settings.archive_url else {}
    return CliRunner().invoke(cli, list(args), input=input, env={"FLEET_BROKER_URL": settings.broker_url,
                                                                 "FLEET_HOME": str(settings.home), **archive,
                                                                 **(env or {})})


OSS_AK, OSS_SK, OSS_TOKEN = "LTAI-test-key", "test-secret", "sts-token-123"
"""The keys of the `server` fixture's OSS server (conftest.py)."""
OSS_REF = ComponentRef("nano-banana", "base", "v1.0.0")


def make_archive(server: OssServer, bucket_name: str, tmp_path: Path, **options) -> OssArchive:
    """An OssArchive on the test server's bucket with small parts, two threads and quick retries."""
    settings = dict(
        endpoint=server.endpoint, access_key_id=OSS_AK, access_key_secret=OSS_SK, checkpoint_dir=tmp_path / "ckpt",
        part_size=128 * 1024, multipart_threshold=256 * 1024, threads=2, retry_backoff=0.01,
    )
    settings.update(options)
    return open_archive(f"oss://{bucket_name}/l3", **settings)


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def meta(producer, task_id: str) -> dict:  # noqa: ANN001 - the `tasks` module of the producer fixture
    """A job's record in the result backend, whatever its state."""
    return producer.app.backend.get_task_meta(task_id)


class Pool:
    """The warm workers of one release; a killed one is replaced by a fresh one under a new name."""

    def __init__(self, settings: FleetSettings, release: str, logs: Path, **env: str) -> None:
        self.settings = settings
        self.release = release
        self.logs = logs
        self.env = env
        self.workers: dict[str, WorkerProc] = {}
        self.started = 0

    def start(self, wait: bool = True) -> WorkerProc:
        self.started += 1
        worker = start_worker(self.settings, [self.release], f"r{self.started}", self.logs, wait=wait, **self.env)
        self.workers[f"{worker.name}@{self.settings.node_name}"] = worker
        return worker

    def wait_all(self, timeout: float = 120) -> None:
        for worker in list(self.workers.values()):
            wait_warm(self.settings, worker, timeout=timeout)

    @classmethod
    @contextmanager
    def running(cls, settings: FleetSettings, release: str, logs: Path, count: int = 2, timeout: float = 120,
                **env: str) -> Iterator[Pool]:
        """`count` workers started together, each waited for until warm (`timeout` each), stopped on exit."""
        pool = cls(settings, release, logs, **env)
        for _ in range(count):
            pool.start(wait=False)
        try:
            pool.wait_all(timeout=timeout)
            yield pool
        finally:
            pool.stop()

    def kill(self, hostname: str) -> None:
        self.workers.pop(hostname).stop(signal.SIGKILL)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def log(self, hostname: str) -> str:
        return self.workers[hostname].log_text()

    def logs_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))


class Calibration:
    """Seconds per denoising step on this machine now (by image side), so a job lasts about as long as a test needs.
    Every finished job refines it: the machine is shared and its speed drifts."""

    SIDES = ((64, 1.0), (96, 2.25), (128, 4.0), (192, 9.0), (256, 16.0))  # a fast machine needs the larger ones

    def __init__(self, producer, release: str = DEMO_RELEASES[1]) -> None:  # noqa: ANN001 - the `tasks` module
        self.per_step: dict[int, float] = {}
        self.learn(producer.generate.delay("calibrate", seed=1, release=release, steps=10).get(timeout=300))

    def learn(self, result: dict) -> None:
        self.per_step[result["width"]] = max(0.002, result["timings"]["inference_ms"] / 1000 / result["steps"])

    def rate(self, side: int, factor: float) -> float:
        return self.per_step.get(side) or self.per_step[64] * factor

    def job(self, seconds: float) -> dict[str, int]:
        """Steps and size for a job of about `seconds`: 64 px first, larger images once 150 steps are not enough."""
        for side, factor in self.SIDES:
            steps = math.ceil(seconds / self.rate(side, factor))
            if steps <= 150:
                return {"steps": max(steps, 4), "width": side, "height": side}
        return {"steps": 150, "width": 256, "height": 256}


def run_sync(env: dict[str, str], release: str, **popen: Any) -> subprocess.CompletedProcess:
    """The operator's `warmfleet sync --release R`, as its own process."""
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", "sync", "--release", release], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, **popen)


def tree(root: Path, skip: tuple[str, ...] = ("locks",)) -> dict[str, tuple[int, int]]:
    """Every file under an L2 root with its size and mtime (links as themselves), lock files aside."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or path.is_dir() and not path.is_symlink():
            continue
        st = path.lstat()
        out[str(rel)] = (st.st_size, st.st_mtime_ns)
    return out


# -- where the reliability tests leave their numbers for bench/reliability_report.py ------------------------------
# A test calls `record_result(...)` once per scenario; nothing is written unless WARMFLEET_RELIABILITY_RESULTS names a
# folder, so an ordinary test run leaves no files behind. (Not FLEET_…: conftest clears those so tests never pick up
# an operator's configuration.)

RESULTS_ENV = "WARMFLEET_RELIABILITY_RESULTS"
TRIALS_ENV = "WARMFLEET_RELIABILITY_TRIALS"


def trial_count(default: int) -> int:
    """Trials of one reliability scenario: WARMFLEET_RELIABILITY_TRIALS when set (the report runs 10), else the
    scenario's own small default, which is what CI runs."""
    value = os.environ.get(TRIALS_ENV)
    return max(1, int(value)) if value else default


def record_result(scenario: str, *, trials: int, sent: int, completed: int, lost: int, duplicated: int,
                  dead: int = 0, recovery_s: list[float] | None = None, bound_s: float | None = None,
                  notes: str = "") -> None:
    """One row of docs/reliability.md's table: sent = completed + dead (recorded as dead letters on purpose) + lost.
    `duplicated` counts jobs whose pipeline ran to completion twice; `recovery_s` is one measurement per trial,
    `bound_s` the bound the settings give."""
    assert sent == completed + dead + lost, (scenario, sent, completed, dead, lost)
    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    row = {"scenario": scenario, "trials": trials, "sent": sent, "completed": completed, "dead": dead, "lost": lost,
           "duplicated": duplicated, "recovery_s": [round(r, 2) for r in recovery_s or []], "bound_s": bound_s,
           "notes": notes, "at": time.time()}
    slug = "".join(c if c.isalnum() else "-" for c in scenario.lower()).strip("-")
    (Path(folder) / f"{slug}.json").write_text(json.dumps(row, indent=1))


PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def image_data(png: bytes) -> bytes:
    """A PNG without its text chunks: the bytes a plain `Image.save(..., format="PNG")` of the same pixels writes.
    The fleet adds provenance text chunks to every image it stores (workers/provenance.py); comparing this with a
    bare diffusers PNG checks that everything else — header, pixels, compression — is byte for byte the same."""
    import struct

    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    out, at = [png[:8]], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        end = at + 12 + length
        if png[at + 4:at + 8] not in PNG_TEXT_CHUNKS:
            out.append(png[at:end])
        at = end
    return b"".join(out)
