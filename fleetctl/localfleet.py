"""A local fleet on embedded defaults: a private redis-server on a free loopback port, one worker per
release, a maintenance worker, Celery beat and Flower — started, tracked in a state file, stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetstate.acl import config_lines, new_passwords, role_urls
from tasks.settings import FleetSettings, offline_environment

from .localredis import RedisNotReady, compact_aof, redis_config, start_time, wait_redis
from .localtls import make_certificates, tls_url


class FleetError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise FleetError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@dataclass
class Proc:
    name: str
    pid: int
    log: str
    stop_signal: int = signal.SIGTERM
    started: float | None = None  # the process's start time (clock ticks since boot): a reused pid is not ours

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = start_time(self.pid)

    def alive(self) -> bool:
        """Running, and the very process that was started (not another that was given its pid since)."""
        return self.pid > 0 and alive(self.pid) and (self.started is None or start_time(self.pid) == self.started)


@dataclass
class FleetState:
    broker_url: str
    home: str
    procs: list[Proc] = field(default_factory=list)
    flower_url: str | None = None
    metrics_url: str | None = None
    archive_url: str | None = None
    oss: dict | None = None
    releases: list[str] = field(default_factory=list)
    flower_user: str | None = None
    flower_password: str | None = None  # only when `up` generated it; the file is mode 0600
    roles: dict[str, str] | None = None  # role → its Redis URL (fleetstate/acl.py); broker_url is the admin's
    api_url: str | None = None  # `warmfleet api`, logged in as the producer role

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold the local OSS keys
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({**self.__dict__, "procs": [p.__dict__ for p in self.procs]}, indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FleetState | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        data["procs"] = [Proc(**p) for p in data.get("procs", [])]
        return cls(**data)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


class LocalFleet:
    def __init__(self, settings: FleetSettings, log=print) -> None:
        self.settings = settings
        self.log = log
        self.state_file = settings.local_fleet_file()
        self.logs = settings.state_dir / "logs"
        self.gone: list[str] = []  # what the last `down` found already gone (not signalled, not "stopped")

    def running(self) -> FleetState | None:
        state = FleetState.load(self.state_file)
        if state is not None:
            self.follow_redis(state)
        if state and any(p.alive() for p in state.procs):
            return state
        return None

    def follow_redis(self, state: FleetState) -> None:
        """The fleet's Redis restarted by hand (same config, same port): take its new pid into the state file, so
        `down` stops the server that runs, not a pid that is gone or now someone else's."""
        import redis

        proc = next((p for p in state.procs if p.name == "redis"), None)
        if proc is None or proc.alive() or not state.broker_url:
            return
        try:
            client = redis.Redis.from_url(state.broker_url, socket_connect_timeout=1, socket_timeout=2)
            info = client.info("server")
            client.close()
        except redis.RedisError:
            return  # not running: nothing to follow
        pid = int(info.get("process_id") or 0)
        expected = (self.settings.state_dir / "redis" / "redis.conf").resolve()
        if pid and Path(str(info.get("config_file") or "")).resolve() == expected:
            proc.pid, proc.started = pid, start_time(pid)
            state.save(self.state_file)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        return Proc(name, proc.pid, str(log_path))

    def child_env(self, broker_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(self.settings.child_env())
        env["FLEET_BROKER_URL"] = broker_url
        offline_environment(env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def up(self, releases: list[str], active: str | None, flower: bool = True, beat: bool = True,
           timeout: float = 180.0, archive: str = "local", gpus: list[int] | None = None) -> FleetState:
        from .gpus import check_gpus, worker_plan

        if gpus:
            check_gpus(gpus)
        if self.running():
            raise FleetError(f"a local fleet is already running (state in {self.state_file}); run `warmfleet down`")
        redis_server = shutil.which("redis-server")
        if not redis_server:
            raise FleetError("redis-server not found on PATH; install it (apt-get install redis-server)")
        home = self.settings.home
        state = FleetState(broker_url="", home=str(home), releases=list(releases))
        try:
            if archive == "oss":
                self._start_oss(state)
            elif archive != "local":
                raise FleetError(f"unknown archive kind {archive!r}: use local or oss")
            self._prepare_models(releases)
            port = free_port()
            redis_dir = self.settings.state_dir / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            password = secrets.token_urlsafe(24)
            state.broker_url = f"redis://:{password}@127.0.0.1:{port}/0"  # kept in the 0600 state file only
            tls = make_certificates(redis_dir / "tls") if self.settings.local_tls else None
            if tls is not None:
                state.broker_url = tls_url(state.broker_url, tls)
            passwords = new_passwords()  # each process logs in as its own role (fleetstate/acl.py)
            state.roles = role_urls(state.broker_url, passwords)
            conf = redis_config(redis_dir, port, password, tls and tls.parent, users=config_lines(passwords))
            state.procs.append(self._spawn("redis", [redis_server, str(conf)], os.environ.copy()))
            state.save(self.state_file)
            wait_port(port)
            try:
                wait_redis(state.broker_url, state.procs[-1])  # listening is not ready: it may still load its AOF
            except RedisNotReady as exc:
                raise FleetError(str(exc)) from None
            env = self.child_env(state.roles["worker"])
            self._route(state.broker_url, releases, active)
            for i, slot in enumerate(worker_plan(releases, gpus)):
                state.procs.append(self._spawn(f"worker-{i}", [
                    sys.executable, "-m", "fleetctl.cli", "worker", "--release", slot.release,
                    "--name", slot.name, *slot.args(), "--loglevel", "INFO",
                ], {**env, **slot.env()}))
            env = self.child_env(state.roles["maintenance"])
            state.procs.append(self._spawn("maintenance", [sys.executable, "-m", "fleetctl.cli", "maintenance-worker"], env))
            if beat:
                schedule = self.settings.state_dir / "beat-schedule"
                state.procs.append(self._spawn("beat", [
                    sys.executable, "-m", "celery", "-A", "tasks.app", "beat", "--schedule", str(schedule),
                    "--loglevel", "INFO",
                ], env))
            mport = self.settings.metrics_port if self._port_free(self.settings.metrics_port) else free_port()
            state.procs.append(self._spawn("metrics", [sys.executable, "-m", "fleetctl.cli", "metrics",
                                                       "--port", str(mport)], self.child_env(state.roles["monitoring"])))
            state.metrics_url = f"http://127.0.0.1:{mport}/metrics"
            if flower:
                fport = self.settings.flower_port if self._port_free(self.settings.flower_port) else free_port()
                args = [sys.executable, "-m", "fleetctl.cli", "flower", "--address=127.0.0.1",
                        f"--port={fport}"]
                env = self.child_env(state.roles["operator"])
                state.procs.append(self._spawn("flower", args, self._flower_env(env, state)))
                state.flower_url = f"http://127.0.0.1:{fport}"
            aport = self.settings.api_port if self.settings.api_port and self._port_free(self.settings.api_port) \
                else free_port()
            state.procs.append(self._spawn("api", [sys.executable, "-m", "fleetctl.cli", "api", "--port", str(aport)], {
                **self.child_env(state.roles["producer"]), "FLEET_API_URL_SECRET": secrets.token_urlsafe(32)}))
            state.api_url = f"http://127.0.0.1:{aport}"
            state.save(self.state_file)
            self._wait_warm(state, releases, timeout)
        except BaseException:
            self.down(state)
            raise
        return state

    def _flower_env(self, env: dict[str, str], state: FleetState) -> dict[str, str]:
        """Flower asks for a password unless FLEET_FLOWER_UNAUTHENTICATED opens it: the configured one, else a fresh
        one, printed once here and kept in the state file (mode 0600). Passed in the environment, not argv, so
        `ps` does not show it."""
        env = dict(env)
        if self.settings.flower_unauthenticated:
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
            self.log("flower: no password (FLEET_FLOWER_UNAUTHENTICATED=true); anyone on this host can use it")
            return env
        password = self.settings.flower_password or secrets.token_urlsafe(18)
        if "," in password:
            raise FleetError("FLEET_FLOWER_PASSWORD may not contain ',' (Flower splits its credentials on commas)")
        env["FLOWER_BASIC_AUTH"] = f"{self.settings.flower_user}:{password}"
        state.flower_user = self.settings.flower_user
        if not self.settings.flower_password:
            state.flower_password = password
            self.log(f"flower: user {self.settings.flower_user}, password {password} "
                     f"(generated; kept in {self.state_file}, mode 0600)")
        return env

    def _start_oss(self, state: FleetState) -> None:
        """The project's OSS-protocol server on loopback, with fresh keys: L3 is then a real oss:// archive."""
        port = free_port()
        oss = {"endpoint": f"http://127.0.0.1:{port}", "access_key_id": "LTAI" + secrets.token_hex(8),
               "access_key_secret": secrets.token_urlsafe(24)}
        checkout = Path(__file__).resolve().parents[1]
        if not (checkout / "ossserver" / "__main__.py").is_file():
            raise FleetError("--archive oss runs the project's OSS development server, which ships with a checkout of "
                             "the project, not with the installed package; run it from a checkout or set "
                             "FLEET_ARCHIVE_URL to a real bucket")
        if str(checkout) not in sys.path:
            sys.path.append(str(checkout))
        from ossserver.__main__ import SECRET_ENV

        env = {**os.environ, SECRET_ENV: oss["access_key_secret"],  # not argv: `ps` shows argv to every local user
               "PYTHONPATH": os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p)}
        state.procs.append(self._spawn("oss", [
            sys.executable, "-m", "ossserver", "--root", str(self.settings.state_dir / "oss"),
            "--port", str(port), "--bucket", "warmfleet", "--access-key-id", oss["access_key_id"],
        ], env))
        wait_port(port)
        state.archive_url = "oss://warmfleet/models"
        state.oss = oss
        self.settings = self.settings.model_copy(update={
            "archive_url": state.archive_url, "oss_endpoint": oss["endpoint"],
            "oss_access_key_id": oss["access_key_id"], "oss_access_key_secret": oss["access_key_secret"]})
        state.save(self.state_file)

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def _prepare_models(self, releases: list[str]) -> None:
        """Embedded defaults: publish the demo models into the archive if they are not there yet."""
        from cachemgr import Release

        from .demo.builders import publish_demo

        archive = self.settings.open_archive()
        missing = [ref for r in releases for ref in Release.parse(r).refs() if not archive.has_version(ref)]
        if not missing:
            return
        workdir = self.settings.state_dir / "demo-build"
        self.log(f"building the demo models into {archive.url} …")
        publish_demo(archive, workdir, log=self.log)
        shutil.rmtree(workdir, ignore_errors=True)
        still = [str(ref) for ref in missing if not archive.has_version(ref)]
        if still:
            raise FleetError(f"not in the archive and not a demo model: {', '.join(still)}; publish them first")

    def _route(self, broker_url: str, releases: list[str], active: str | None) -> None:
        import redis

        from cachemgr import Release
        from fleetstate.routes import RouteTable

        table = RouteTable(redis.Redis.from_url(broker_url))
        by_model: dict[str, list[str]] = {}
        for r in releases:
            by_model.setdefault(Release.parse(r).model, []).append(r)
        for model, rels in by_model.items():
            if table.active(model):
                continue
            target = active if active and Release.parse(active).model == model else rels[-1]
            for r in rels:  # history: older releases first, the target last
                if r != target:
                    table.set_active(r, actor="warmfleet up", reason="initial route")
            table.set_active(target, actor="warmfleet up", reason="initial route")

    def _wait_warm(self, state: FleetState, releases: list[str], timeout: float) -> None:
        import redis

        from fleetstate.registry import WarmRegistry

        registry = WarmRegistry(redis.Redis.from_url(state.broker_url))
        since = time.time() - 1
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in state.procs if not p.alive()]
            if dead:
                tail = Path(dead[0].log).read_text(errors="replace")[-2000:] if Path(dead[0].log).exists() else ""
                raise FleetError(f"{dead[0].name} exited during start; its log ({dead[0].log}) ends:\n{tail}")
            try:
                registry.wait_warm(releases, timeout=min(2.0, max(0.1, deadline - time.monotonic())), since=since)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise FleetError(f"workers not warm after {timeout:.0f}s; see logs in {self.logs}") from None
            except RuntimeError as exc:
                raise FleetError(str(exc)) from None

    def down(self, state: FleetState | None = None, timeout: float = 15.0) -> list[str]:
        """Stop what the fleet started: workers first, redis last (its AOF compacted first, so the next `up` loads
        it quickly). Nothing it did not start is touched: a process already gone, or a pid now someone else's, is
        not signalled and not reported as stopped (`self.gone` names them)."""
        state = state or FleetState.load(self.state_file)
        self.gone = []
        if state is None:
            return []
        self.follow_redis(state)
        stopped = []
        last = ("redis", "oss")  # the fleet's own services stop after everything that uses them
        for group in ([p for p in state.procs if p.name not in last], [p for p in state.procs if p.name in last]):
            group = [p for p in group if p.alive() or self.gone.append(p.name)]
            if any(p.name == "redis" for p in group):
                compact_aof(state.broker_url, self.log)
            for p in group:
                _signal(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout * (4 if any(p.name == "redis" for p in group) else 1)
            for p in group:
                while alive(p.pid) and time.monotonic() < deadline:
                    _reap(p.pid)
                    time.sleep(0.05)
                if alive(p.pid):
                    _signal(p.pid, signal.SIGKILL)
                    time.sleep(0.1)
                _reap(p.pid)
                stopped.append(p.name)
        if self.state_file.exists():
            current = FleetState.load(self.state_file)
            if current is None or current.broker_url == state.broker_url:
                self.state_file.unlink(missing_ok=True)
        return stopped


def _signal(pid: int, sig: int) -> None:
    """Signal the process group a fleet process leads (it was started in a session of its own), or the process
    alone when it leads none (a Redis the operator restarted by hand, followed by `follow_redis`)."""
    try:
        os.killpg(pid, sig)
        return
    except ProcessLookupError:
        pass
    except PermissionError:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def redacted(url: str) -> str:
    """A Redis URL fit to print: the password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
