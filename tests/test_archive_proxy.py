"""L3 through a site's HTTP proxy (FLEET_ARCHIVE_PROXY): a real tinyproxy on loopback in front of the OSS dev
server, a node syncing through it, and a proxy that corrupts bytes, whose bytes never reach L2."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import save_file

from cachemgr import open_archive
from cachemgr.archive import ArchiveError
from cachemgr.archive.oss import OssArchive
from cachemgr.names import ComponentRef
from cachemgr.store import ChecksumMismatch, SnapshotStore
from fleetctl.localfleet import free_port, wait_port
from ossserver import OssServer
from tasks.maintenance import run_sync
from tasks.settings import FleetSettings

pytestmark = pytest.mark.integration
AK, SK = "proxy-ak", "proxy-sk"
REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (\w+) (\S+) HTTP/")


class TinyProxy:
    """tinyproxy (Debian package; `./fleet setup` installs it) in the foreground on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("tinyproxy")
        assert exe, "tinyproxy must be installed (apt-get install tinyproxy, or ./fleet setup)"
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder / "tinyproxy.log"
        conf = folder / "tinyproxy.conf"
        conf.write_text(f'Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\nMaxClients 64\n'
                        f'LogFile "{self.log}"\nLogLevel Info\n')
        self.proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=open(folder / "stdout.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, absolute URL) of every request the proxy forwarded, in order."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return REQUEST_LINE.findall(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


class FlippingRelay:
    """A bad proxy: relays to a real one and flips the first body byte of each answer to an object read."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flipped = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
            first = conn.recv(65536)
            line = first.split(b"\r\n", 1)[0].decode(errors="replace")
            _, url, *_ = line.split(" ") + ["", ""]
            corrupt = line.startswith("GET ") and "?" not in url and not url.endswith("manifest.json")
            up.sendall(first)

            def forward() -> None:
                try:
                    while data := conn.recv(65536):
                        up.sendall(data)
                except OSError:
                    pass

            threading.Thread(target=forward, daemon=True).start()
            head = b""
            while data := up.recv(65536):
                if corrupt:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0 or end + 4 >= len(head):
                        continue
                    body = bytearray(head)
                    body[end + 4] ^= 0xFF
                    data, corrupt, head = bytes(body), False, b""
                    self.flipped += 1
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def write_version(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    tensors = {f"t{i}": np.random.default_rng(i + 100 * (seed if i < 2 else 0)).integers(0, 255, 96 << 10, np.uint8)
               for i in range(12)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"layers": 12}')
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxied")
    proxy = TinyProxy(root / "proxy")
    with OssServer(root / "oss", access_key_id=AK, access_key_secret=SK) as oss:
        oss.create_bucket("models")
        publisher = OssArchive("models", "site", endpoint=oss.endpoint, access_key_id=AK, access_key_secret=SK)
        manifests = {v: publisher.publish(ComponentRef("m", "base", v), write_version(root / "build" / v, seed))
                     for v, seed in (("v1", 0), ("v2", 1))}
        publisher.close()
        yield {"oss": oss, "proxy": proxy, "manifests": manifests, "root": root}
    proxy.stop()


def node_settings(site, name: str, proxy: str) -> FleetSettings:
    return FleetSettings(home=site["root"] / name, node_name=name, archive_url="oss://models/site",
                         oss_endpoint=site["oss"].endpoint, oss_access_key_id=AK, oss_access_key_secret=SK,
                         archive_proxy=proxy)


def test_a_node_syncs_l3_through_the_sites_proxy_and_every_request_goes_through_it(site):
    oss, proxy, manifests = site["oss"], site["proxy"], site["manifests"]
    settings = node_settings(site, "proxied", proxy.url)
    oss_since, proxy_since = len(oss.requests), len(proxy.requests())
    first = run_sync(settings, refs=[manifests["v1"].ref])  # whole files: plain GETs
    second = run_sync(settings, refs=[manifests["v2"].ref])  # a differential sync: ranged GETs of changed tensors
    assert first["from_l3"] == manifests["v1"].total_size
    assert 0 < second["from_l3"] < manifests["v2"].total_size / 2
    seen_by_oss = oss.requests[oss_since:]
    seen_by_proxy = proxy.requests()[proxy_since:]
    assert len(seen_by_proxy) == len(seen_by_oss) > 0  # nothing went around the proxy
    assert sorted(unquote(urlparse(url).path) for _, url in seen_by_proxy) == sorted(f"/{r.bucket}/{r.key}" for r in seen_by_oss)
    read = {unquote(urlparse(url).path).rsplit("/", 1)[1] for method, url in seen_by_proxy if method == "GET"}
    assert {"model.safetensors", "config.json", "manifest.json"} <= read
    store = SnapshotStore(settings.resolved_cache_root)
    for manifest in manifests.values():
        assert store.has(manifest.ref)
        assert all(check.ok for check in store.check(manifest.ref))


def test_a_proxy_that_corrupts_bytes_gets_nothing_into_l2_and_the_next_sync_is_whole(site):
    """Whole files (a fresh node) and ranges of changed tensors (a differential sync) through a corrupting proxy:
    each sync fails, L2 holds only blobs that hash to their names, and a sync through a sound proxy completes."""
    proxy, manifests = site["proxy"], site["manifests"]
    bad = FlippingRelay(proxy.port)
    behind_bad, behind_good = (node_settings(site, "behind-bad-proxy", url) for url in (bad.url, proxy.url))
    store = SnapshotStore(behind_bad.resolved_cache_root)
    try:
        for ref in (manifests["v1"].ref, manifests["v2"].ref):
            flipped = bad.flipped
            with pytest.raises((ArchiveError, ChecksumMismatch), match="the bytes were discarded"):
                run_sync(behind_bad, refs=[ref])
            assert bad.flipped > flipped
            assert not store.has(ref)
            blobs = list(store.blobs.iterdir()) if store.blobs.exists() else []
            assert all(hashlib.sha256(b.read_bytes()).hexdigest() == b.name for b in blobs)
            assert manifests[ref.version].file("model.safetensors").sha256 not in {b.name for b in blobs}
            healed = run_sync(behind_good, refs=[ref])
            assert healed["from_l3"] > 0
            assert store.has(ref) and all(c.ok for c in store.check(ref))
        rejected = [json.loads(line) for line in behind_bad.event_log_path.read_text().splitlines()]
        assert {e["version"] for e in rejected if e["event"] == "L2_VERIFY" and e["outcome"] == "REJECTED"} \
            == {"v1", "v2"}
    finally:
        bad.close()


def test_a_proxy_setting_that_is_not_an_http_url_or_names_a_local_archive_is_refused(site, tmp_path):
    with pytest.raises(ValidationError, match="expected http://host:port"):
        FleetSettings(home=tmp_path, archive_proxy="socks5://127.0.0.1:1080")
    with pytest.raises(ArchiveError, match="unset FLEET_ARCHIVE_PROXY"):
        open_archive(tmp_path.as_uri(), proxy=site["proxy"].url)
    with pytest.raises(ArchiveError, match="FLEET_ARCHIVE_PROXY"):
        OssArchive("models", "site", endpoint=site["oss"].endpoint, proxy="http://127.0.0.1:notaport")
