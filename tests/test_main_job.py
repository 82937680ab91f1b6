"""The README's main job — up, a few generations, down — run as a user runs it, in temporary folders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.localfleet import alive, free_port

from .support import REPO

pytestmark = pytest.mark.integration


def run_cli(args: list[str], home: Path, archive: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_HOME=str(home), FLEET_ARCHIVE_URL=archive.as_uri(), FLEET_FLOWER_PORT=str(free_port()),
               FLEET_METRICS_PORT=str(free_port()),
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=timeout)


def test_demo_serves_real_images_and_leaves_no_process_behind(tmp_path, demo_archive_dir):
    home = tmp_path / "home"
    home.mkdir()
    done = run_cli(["demo"], home, demo_archive_dir)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    names = re.findall(r"^  (\S+)\s+pid", out, re.M)
    assert set(names) >= {"redis", "worker-0", "worker-1", "maintenance", "beat", "flower", "metrics"}
    images = re.findall(r"file://(\S+\.png)", out)
    assert len(images) == 4
    for image in images:
        assert Path(image).read_bytes().startswith(b"\x89PNG")
        assert Path(image).is_relative_to(home / "outputs")
    assert "nano-banana@base-v1.1.0+lora-v2.3.1" in out and "nano-banana@base-v1.0.0+lora-v2.3.0" in out
    assert f"images are in {(home / 'outputs').as_uri()}" in out
    sheet = re.search(r"^contact sheet: (\S+\.png)$", out, re.M)
    assert sheet and Path(sheet[1]) == home / "state" / "demo-sheet.png", out
    assert Path(sheet[1]).read_bytes().startswith(b"\x89PNG")
    assert [p for p in pids if alive(p)] == []
    assert not (home / "state" / "fleet.json").exists()


def test_up_then_python_producer_then_down(tmp_path, demo_archive_dir):
    """`warmfleet up` in the background; a producer in another process finds the fleet; `down` stops it."""
    home = tmp_path / "home"
    home.mkdir()
    up = run_cli(["up", "--no-flower"], home, demo_archive_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        code = (
            "from tasks import generate\n"
            "r = generate.delay('Leather Jacket', seed=5).get(timeout=120)\n"
            "print(r['release'], r['image_uri'], r['seed'], r['width'], r['height'], r['steps'])\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(FLEET_HOME=str(home), PYTHONPATH=str(REPO))
        producer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=home,
                                  timeout=180)
        assert producer.returncode == 0, producer.stderr
        release, uri, seed, width, height, steps = producer.stdout.split()
        assert release == "nano-banana@base-v1.1.0+lora-v2.3.1"
        assert (seed, width, height, steps) == ("5", "64", "64", "4")
        assert Path(uri.removeprefix("file://")).read_bytes().startswith(b"\x89PNG")
        status = run_cli(["status"], home, demo_archive_dir)
        assert status.returncode == 0, status.stderr
        assert re.search(r"gpu1@\S+\s+warm\s+1\s+1\s", status.stdout), status.stdout
    finally:
        pids = [int(p) for p in re.findall(r"pid (\d+)", up.stdout)]
        down = run_cli(["down"], home, demo_archive_dir)
    assert down.returncode == 0 and "stopped:" in down.stdout, down.stdout + down.stderr
    assert [p for p in pids if alive(p)] == []
    again = run_cli(["down"], home, demo_archive_dir)
    assert "no local fleet is running" in again.stdout


def test_cli_errors_are_one_line_without_a_traceback(tmp_path, demo_archive_dir):
    home = tmp_path / "home"
    home.mkdir()
    done = run_cli(["generate", "x"], home, demo_archive_dir)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "no broker configured" in done.stderr
    bad = run_cli(["sync", "--release", "../../etc@base-v1"], home, demo_archive_dir)
    assert bad.returncode == 1 and "invalid" in bad.stderr and "Traceback" not in bad.stderr
