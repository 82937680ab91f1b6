"""The OSS dev server's emulated link: a bandwidth cap shared by all connections (each direction) and a delay
added to every request. Asserted on ratios: the rate the server's own emulation measured, and bytes ÷ time seen by
the client, against the cap; never an absolute time budget."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import oss2
import pytest

from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef
from ossserver import Link, OssServer
from ossserver.link import parse_rate

AK, SK = "link-ak", "link-sk"
RATE_BPS = 80e6  # 10 MB/s each way
SIZE = 12 << 20
REF = ComponentRef("m", "base", "v1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    with OssServer(tmp_path_factory.mktemp("oss"), access_key_id=AK, access_key_secret=SK,
                   link=Link(rate_bps=RATE_BPS)) as server:
        server.create_bucket("models")
        yield server


def test_upload_and_parallel_download_are_held_to_the_shared_cap(capped, tmp_path):
    source = tmp_path / "w.safetensors"
    source.write_bytes(os.urandom(SIZE))
    archive = OssArchive("models", "p", endpoint=capped.endpoint, access_key_id=AK, access_key_secret=SK,
                         part_size=1 << 20, threads=4, multipart_threshold=64 << 20)
    cap = RATE_BPS / 8

    capped.link.reset_stats()
    archive.put_file(REF, "w.safetensors", source)  # one PUT: the uplink's cap
    up = capped.link.up.stats
    assert up.bytes == SIZE
    assert 0.9 <= up.rate / cap <= 1.1, f"uplink carried {up.rate / 1e6:.2f} MB/s for a {cap / 1e6:.2f} MB/s cap"

    capped.link.reset_stats()
    started = time.monotonic()
    with open(tmp_path / "copy", "w+b") as dest:
        archive.download(REF, "w.safetensors", dest)  # four connections at once share one cap
    elapsed = time.monotonic() - started
    down = capped.link.down.stats
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert down.bytes == SIZE
    assert 0.9 <= down.rate / cap <= 1.1, f"downlink carried {down.rate / 1e6:.2f} MB/s for {cap / 1e6:.2f} MB/s"
    assert 0.9 <= (SIZE / elapsed) / cap <= 1.1, f"the client saw {SIZE / elapsed / 1e6:.2f} MB/s"
    archive.close()


def test_every_request_pays_the_added_delay(tmp_path):
    with OssServer(tmp_path / "oss", link=Link(delay_ms=40)) as server:
        server.create_bucket("models")
        bucket = oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, "models")
        bucket.put_object("k", b"x")
        server.link.reset_stats()
        started = time.monotonic()
        for _ in range(10):
            bucket.head_object("k")
        elapsed = time.monotonic() - started
        stats = server.link.down.stats
        assert stats.delayed_requests == 10
        assert stats.delay_seconds / stats.delayed_requests >= 0.040
        assert elapsed / (10 * 0.040) >= 1.0


def test_an_unlimited_server_adds_nothing(tmp_path):
    with OssServer(tmp_path / "oss") as server:
        server.create_bucket("models")
        oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, "models").put_object("k", b"x" * 1000)
        assert not server.link.active
        assert server.link.down.stats.delayed_requests == 0


@pytest.mark.parametrize("text,bps", [("100mbit", 100e6), ("100Mbps", 100e6), ("1g", 1e9), ("12.5MB/s", 100e6)])
def test_link_rates_are_read_in_bits_unless_written_as_bytes(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_the_server_process_takes_its_link_from_the_environment(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OSS_SERVER_LINK_DELAY_MS": "50", "OSS_SERVER_LINK_RATE": "800mbit"}
    proc = subprocess.Popen([sys.executable, "-m", "ossserver", "--root", str(tmp_path), "--bucket", "models"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        endpoint = proc.stdout.readline().strip()
        bucket = oss2.Bucket(oss2.AnonymousAuth(), endpoint, "models")
        bucket.put_object("k", b"x")
        started = time.monotonic()
        for _ in range(6):
            bucket.head_object("k")
        assert (time.monotonic() - started) / (6 * 0.050) >= 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "ossserver", "--root", str(tmp_path), "--link-rate", "fast"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert bad.returncode != 0 and "100mbit" in bad.stderr
