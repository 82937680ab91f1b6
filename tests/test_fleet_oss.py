"""The fleet with L3 (and the output store) on OSS, through the project's OSS-protocol server and oss2."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cachemgr import LocalArchive, Release
from cachemgr.archive.oss import OssArchive
from fleetctl.localfleet import alive, free_port
from ossserver import OssServer
from tasks.settings import FleetSettings
from workers.outputs.oss import OssOutputStore

from .support import REPO, fleet_settings_for

pytestmark = pytest.mark.integration

KEY_ID, SECRET = "LTAItestkey0001", "s3cr3t-never-logged-7f2a"


@pytest.fixture(scope="module")
def oss_server(tmp_path_factory):
    server = OssServer(tmp_path_factory.mktemp("oss"), access_key_id=KEY_ID, access_key_secret=SECRET).start()
    server.create_bucket("ai-models")
    server.create_bucket("outputs")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet_settings(redis_server, demo_archive_dir, oss_server, tmp_path_factory) -> FleetSettings:
    """Workers of this module read L3 from OSS and write images to OSS."""
    creds = {"endpoint": oss_server.endpoint, "access_key_id": KEY_ID, "access_key_secret": SECRET}
    local = LocalArchive(demo_archive_dir)
    remote = OssArchive("ai-models", "nano-banana", **creds)
    for release in ("nano-banana@base-v1.0.0+lora-v2.3.0", "nano-banana@base-v1.1.0+lora-v2.3.1"):
        for ref in Release.parse(release).refs():
            if not remote.has_version(ref):
                manifest = local.read_manifest(ref)
                remote.publish(ref, demo_archive_dir / ref.model / ref.component / ref.version, meta=manifest.meta)
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, "oss://ai-models/nano-banana",
                              output_url="oss://outputs/images", oss_endpoint=oss_server.endpoint,
                              oss_access_key_id=KEY_ID, oss_access_key_secret=SECRET)


def test_workers_fill_l2_from_oss_and_write_images_to_oss(fleet_settings, producer, two_workers, oss_server):
    old, new = two_workers["releases"]
    result = producer.generate.delay("Leather Jacket", seed=11).get(timeout=120)
    assert result["release"] == new
    assert result["image_uri"] == f"oss://outputs/images/{result['task_id']}.png"
    store = OssOutputStore.from_url("oss://outputs/images", endpoint=oss_server.endpoint, access_key_id=KEY_ID,
                                    access_key_secret=SECRET)
    assert store.get(f"{result['task_id']}.png").startswith(b"\x89PNG")
    for release in (old, new):
        for ref in Release.parse(release).refs():
            assert fleet_settings.open_archive().has_version(ref)
    requested = {r.key for r in oss_server.requests if r.method == "GET" and r.bucket == "ai-models"}
    assert any(k.endswith("unet/diffusion_pytorch_model.safetensors") for k in requested)
    for worker in (two_workers["old"], two_workers["new"]):
        assert SECRET not in worker.log_text()


def run_cli(args: list[str], home: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_HOME=str(home), FLEET_FLOWER_PORT=str(free_port()), FLEET_METRICS_PORT=str(free_port()),
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=timeout)


def test_up_with_an_oss_archive_serves_and_the_cli_finds_the_archive(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    up = run_cli(["up", "--archive", "oss", "--no-flower", "--no-beat"], home)
    pids = [int(p) for p in re.findall(r"pid (\d+)", up.stdout)]
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "archive  oss://warmfleet/models at http://127.0.0.1:" in up.stdout
        state_file = home / "state" / "fleet.json"
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600  # it holds the local OSS keys
        import json

        state = json.loads(state_file.read_text())
        secret = state["oss"]["access_key_secret"]
        for proc in state["procs"]:  # no process of the fleet carries the secret in its argv
            assert secret not in Path(f"/proc/{proc['pid']}/cmdline").read_bytes().decode(errors="replace")
        versions = run_cli(["versions", "nano-banana"], home)
        assert versions.returncode == 0, versions.stderr
        assert re.search(r"nano-banana/base/v1\.1\.0\s+L2", versions.stdout), versions.stdout
        done = run_cli(["generate", "Leather Jacket", "--seed", "3"], home)
        assert done.returncode == 0, done.stderr
        assert '"release": "nano-banana@base-v1.1.0+lora-v2.3.1"' in done.stdout
    finally:
        down = run_cli(["down"], home)
    assert down.returncode == 0 and "oss" in down.stdout and "redis" in down.stdout
    assert [p for p in pids if alive(p)] == []


@pytest.mark.parametrize(
    "case,expect",
    [
        ("wrong-secret", "credentials"),
        ("missing-bucket", "bucket"),
        ("network-down", "cannot reach"),
        ("missing-version", "not in the archive"),
    ],
)
def test_oss_errors_are_one_line_naming_what_to_check(oss_server, tmp_path, case, expect):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_HOME=str(tmp_path), PYTHONPATH=str(REPO), FLEET_ARCHIVE_URL="oss://ai-models/nano-banana",
               FLEET_OSS_ENDPOINT=oss_server.endpoint, FLEET_OSS_ACCESS_KEY_ID=KEY_ID,
               FLEET_OSS_ACCESS_KEY_SECRET=SECRET)
    args = ["versions"]
    if case == "wrong-secret":
        env["FLEET_OSS_ACCESS_KEY_SECRET"] = "not-the-secret"
    elif case == "missing-bucket":
        env["FLEET_ARCHIVE_URL"] = "oss://no-such-bucket/x"
    elif case == "network-down":
        env["FLEET_OSS_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    else:
        args = ["sync", "--release", "nano-banana@base-v7.7.7"]
    done = subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0].lower(), done.stderr
    assert SECRET not in done.stderr and "not-the-secret" not in done.stderr
