"""The local fleet's Redis requires a password that `warmfleet up` generates: kept in the 0600 state file, given to
redis-server through a 0600 config file, never in argv or printed; producers and the CLI on the machine find the
fleet with no configuration."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from fleetctl.demo.builders import DEMO_RELEASES
from fleetctl.localfleet import LocalFleet, redacted
from tasks.settings import FleetSettings, offline_environment

from .support import REPO

pytestmark = pytest.mark.integration


def test_redacted_hides_the_password_only():
    assert redacted("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted("redis://u:s3cret@h:1/0") == "redis://u:***@h:1/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def local_fleet(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    settings = FleetSettings(home=home, archive_url=demo_archive_dir.as_uri(), torch_threads=1, node_name="authnode")
    printed: list[str] = []
    fleet = LocalFleet(settings, log=printed.append)
    state = fleet.up([DEMO_RELEASES[1]], None, flower=False, beat=False)
    try:
        yield settings, state, printed
    finally:
        fleet.down(state)


def test_the_local_redis_refuses_a_client_without_the_password(local_fleet):
    settings, state, _ = local_fleet
    url = urlsplit(state.broker_url)
    assert url.password and len(url.password) >= 24
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=url.port).ping()
    assert redis.Redis.from_url(state.broker_url).ping()


def test_the_password_is_in_0600_files_only_never_in_argv(local_fleet):
    settings, state, printed = local_fleet
    password = urlsplit(state.broker_url).password
    conf = settings.state_dir / "redis" / "redis.conf"
    for path in (conf, settings.local_fleet_file()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert f"requirepass {password}" in conf.read_text()
    for proc in state.procs:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert password not in cmdline, proc.name
    assert not any(password in line for line in printed)


def test_status_and_producers_find_the_fleet_without_configuration(local_fleet):
    settings, state, _ = local_fleet
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_HOME": str(settings.home), "PYTHONPATH": str(REPO)})
    offline_environment(env)
    status = subprocess.run([sys.executable, "-m", "fleetctl.cli", "status"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert DEMO_RELEASES[1] in status.stdout
    assert urlsplit(state.broker_url).password not in status.stdout + status.stderr
    code = ("from tasks import generate; r = generate.delay('found without configuration', steps=2, width=32, "
            "height=32); print(r.get(timeout=120)['release'])")
    produced = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=180)
    assert produced.returncode == 0, produced.stderr[-2000:]
    assert produced.stdout.strip() == DEMO_RELEASES[1]
