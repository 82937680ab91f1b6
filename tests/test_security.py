"""Security defaults of the fleet: Flower asks for a password unless explicitly opened, every server the fleet starts
listens on loopback only, Redis passwords and TLS work through the URL settings, and archive credentials never show
up in logs, errors or status output."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis

from fleetctl.demo.builders import DEMO_RELEASES
from fleetctl.localfleet import FleetState, LocalFleet, alive, free_port, wait_port
from tasks.settings import FleetSettings

from .support import REPO, child_env, fleet_settings_for, start_worker

pytestmark = pytest.mark.integration

NEW = DEMO_RELEASES[1]


def cli(args: list[str], home: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    base.update(FLEET_HOME=str(home), FLEET_FLOWER_PORT=str(free_port()), FLEET_METRICS_PORT=str(free_port()),
                PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], capture_output=True, text=True, env=base,
                          cwd=home, timeout=timeout)


def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process (and its children) listens on."""
    found = set()
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        for conn in p.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def test_up_protects_flower_binds_loopback_and_never_leaks_the_archive_keys(tmp_path):
    """`warmfleet up --archive oss` with no password configured: Flower gets a fresh one, printed once and kept in
    the 0600 state file; redis, the OSS server, metrics and Flower listen on 127.0.0.1 only; the OSS secret and the
    Flower password appear in no log, no CLI error and no status output."""
    home = tmp_path / "home"
    home.mkdir()
    up = cli(["up", "--archive", "oss", "--no-beat", "--release", NEW], home)
    pids = [int(p) for p in re.findall(r"pid (\d+)", up.stdout)]
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        state_file = home / "state" / "fleet.json"
        state = FleetState.load(state_file)
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        password, secret = state.flower_password, state.oss["access_key_secret"]
        assert password and len(password) >= 20
        assert up.stdout.count(password) == 1 and f"user admin, password {password}" in up.stdout

        flower = next(p for p in state.procs if p.name == "flower")
        port = int(state.flower_url.rsplit(":", 1)[1])
        wait_port(port, timeout=60)
        assert http_status(f"{state.flower_url}/api/workers") == 401
        assert http_status(f"{state.flower_url}/api/workers", "admin", "wrong") == 401
        assert http_status(f"{state.flower_url}/api/workers", "admin", password) == 200
        assert password not in " ".join(psutil.Process(flower.pid).cmdline())  # not shown by `ps`

        for name in ("redis", "oss", "metrics", "flower"):
            proc = next(p for p in state.procs if p.name == name)
            addresses = listening(proc.pid)
            assert addresses, f"{name} listens on nothing"
            assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in addresses), (name, addresses)
        for proc in state.procs:  # workers, maintenance: no listening socket at all, or loopback
            assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening(proc.pid)), proc.name

        outputs = {
            "status": cli(["status"], home),
            "versions": cli(["versions", "nano-banana"], home),
            "cache log": cli(["cache", "log", "-n", "500"], home),
            "sync error": cli(["sync", "--release", "nano-banana@base-v9.9.9"], home),
            "wrong key error": cli(["versions"], home, FLEET_ARCHIVE_URL="oss://warmfleet/models",
                                   FLEET_OSS_ENDPOINT=state.oss["endpoint"],
                                   FLEET_OSS_ACCESS_KEY_ID=state.oss["access_key_id"],
                                   FLEET_OSS_ACCESS_KEY_SECRET=secret + "x"),
        }
        assert outputs["status"].returncode == 0 and outputs["versions"].returncode == 0
        assert outputs["sync error"].returncode == 1 and "not in the archive" in outputs["sync error"].stderr
        assert outputs["wrong key error"].returncode == 1 and "credentials" in outputs["wrong key error"].stderr
        for what, done in outputs.items():
            assert secret not in done.stdout + done.stderr, what
            assert password not in done.stdout + done.stderr, what
        logs = {p.name: p.read_text(errors="replace") for p in (home / "state" / "logs").glob("*.log")}
        assert {"redis.log", "oss.log", "worker-0.log", "flower.log"} <= set(logs)
        for name, text in logs.items():
            assert secret not in text and password not in text, name
        events = (home / "events.jsonl").read_text()
        assert secret not in events and password not in events
    finally:
        down = cli(["down"], home)
    assert down.returncode == 0, down.stderr
    assert [p for p in pids if alive(p)] == []


def test_flower_is_opened_only_when_asked_and_a_configured_password_is_not_stored(tmp_path):
    logs: list[str] = []
    state = FleetState(broker_url="redis://127.0.0.1:1/0", home=str(tmp_path))

    opened = LocalFleet(FleetSettings(home=tmp_path, flower_unauthenticated=True), log=logs.append)
    env = opened._flower_env({}, state)
    assert env.get("FLOWER_UNAUTHENTICATED_API") == "true" and "FLOWER_BASIC_AUTH" not in env
    assert state.flower_password is None and "no password" in logs[-1]

    configured = LocalFleet(FleetSettings(home=tmp_path, flower_password="chosen-by-ops"), log=logs.append)
    env = configured._flower_env({}, state)
    assert env["FLOWER_BASIC_AUTH"] == "admin:chosen-by-ops" and "FLOWER_UNAUTHENTICATED_API" not in env
    assert state.flower_password is None and not any("chosen-by-ops" in line for line in logs)

    generated = LocalFleet(FleetSettings(home=tmp_path), log=logs.append)
    first = generated._flower_env({}, state)["FLOWER_BASIC_AUTH"]
    second = generated._flower_env({}, FleetState(broker_url="", home=str(tmp_path)))["FLOWER_BASIC_AUTH"]
    assert first.startswith("admin:") and first != second  # fresh each time, never a built-in default


def test_an_explicitly_opened_flower_answers_without_credentials(redis_server, tmp_path):
    """The one way to run Flower without a password is to say so; then its API answers anyone on loopback."""
    settings = FleetSettings(home=tmp_path, broker_url=redis_server.url, flower_unauthenticated=True)
    port = free_port()
    env = LocalFleet(settings, log=lambda *_: None)._flower_env(child_env(settings), FleetState("", str(tmp_path)))
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks.app", "flower", "--address=127.0.0.1",
                             f"--port={port}"], env=env, cwd=REPO, stdout=open(tmp_path / "flower.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, timeout=60)
        assert http_status(f"http://127.0.0.1:{port}/api/workers") == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


class PrivateRedis:
    """A redis-server of this module's own, with a password and optionally TLS only (no plain port)."""

    def __init__(self, folder: Path, password: str, tls: Path | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [shutil.which("redis-server"), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                "--appendonly", "no", "--requirepass", password]
        if tls is None:
            argv += ["--port", str(self.port)]
        else:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls / "cert.pem"),
                     "--tls-key-file", str(tls / "key.pem"), "--tls-ca-cert-file", str(tls / "cert.pem"),
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(argv, stdout=open(folder / "redis.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def serve_one_job(settings: FleetSettings, logs: Path) -> dict:
    """A worker and a producer both configured by the URL settings alone; one job through them."""
    import tasks

    tasks.configure(settings)
    worker = start_worker(settings, [NEW], "w-secure", logs)
    try:
        return tasks.generate.delay("through a protected broker", seed=1, release=NEW).get(timeout=300) | {
            "log": worker.log_text()}
    finally:
        worker.stop()
        tasks.app.pool.force_close_all()


def test_a_redis_password_in_the_url_settings_is_used_and_never_logged(demo_archive_dir, tmp_path):
    server = PrivateRedis(tmp_path / "redis", "redis-pass-6c1e")
    try:
        url = f"redis://:redis-pass-6c1e@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        settings = fleet_settings_for(tmp_path / "home", url, demo_archive_dir)
        result = serve_one_job(settings, tmp_path / "logs")
        assert result["worker"] == "w-secure@testnode"
        assert "redis-pass-6c1e" not in result["log"]
        assert "redis://:**@127.0.0.1" in result["log"]  # Celery's banner masks it
    finally:
        server.stop()


@pytest.fixture
def certificate(tmp_path) -> Path:
    folder = tmp_path / "tls"
    folder.mkdir()
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                           "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                          cwd=folder, capture_output=True, text=True)
    assert made.returncode == 0, f"openssl could not make a test certificate: {made.stderr.strip()}"
    return folder


def test_tls_to_redis_through_a_rediss_url_with_certificate_verification(demo_archive_dir, tmp_path, certificate):
    # a redis-server built without TLS refuses --tls-port and never listens: that fails here, it is not skipped
    server = PrivateRedis(tmp_path / "redis", "tls-pass-41d0", tls=certificate)
    try:
        ca = certificate / "cert.pem"
        url = f"rediss://:tls-pass-41d0@127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, password="tls-pass-41d0", socket_timeout=5).ping()  # no plain text
        other = tmp_path / "other-ca.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                        "-out", str(other), "-days", "1", "-subj", "/CN=someone-else"], capture_output=True, check=True)
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(url.replace(str(ca), str(other))).ping()  # verification is real
        settings = fleet_settings_for(tmp_path / "home", url, demo_archive_dir)
        result = serve_one_job(settings, tmp_path / "logs")
        assert result["worker"] == "w-secure@testnode"
        assert "tls-pass-41d0" not in result["log"]
        assert json.loads(redis.Redis.from_url(url).get(f"celery-task-meta-{result['task_id']}"))["status"] == "SUCCESS"
    finally:
        server.stop()
