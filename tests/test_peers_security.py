"""The peer piece server serves verified L2 blobs by sha256 only, to signed requests only, on the configured address
only. Requests are made with plain http.client against a real server on loopback."""

from __future__ import annotations

import hashlib
import http.client
import os
import time

import pytest

from cachemgr.peers import HDR_EXPIRES, HDR_SIGNATURE, PeerClient, PeerError, PeerServer, signature
from cachemgr.store import SnapshotStore
from tasks.peering import peer_source, start_peer_server
from tasks.settings import FleetSettings

SECRET = "site-secret"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2")
    store = SnapshotStore(root / "l2")
    src = root / "src.bin"
    body = os.urandom(300_000)
    src.write_bytes(body)
    good = hashlib.sha256(body).hexdigest()
    store.add_blob_from_file(src, good, len(body))
    bad_body = os.urandom(5000)
    (root / "q.bin").write_bytes(bad_body)
    quarantined = hashlib.sha256(bad_body).hexdigest()
    store.add_blob_from_file(root / "q.bin", quarantined, len(bad_body))
    store.quarantine_blob(quarantined)
    partial = hashlib.sha256(b"partial").hexdigest()
    (store.tmp / f"{partial}.123.abcd1234.incomplete").write_bytes(b"partial bytes")
    store.partial_path(partial).write_bytes(b"partial bytes")
    with PeerServer(store, SECRET) as server:
        yield {"server": server, "store": store, "body": body, "good": good, "quarantined": quarantined,
               "partial": partial}


def raw(server: PeerServer, method: str, path: str, byte_range: str = "", secret: str | None = SECRET,
        expires: int | None = None) -> tuple[int, bytes]:
    headers = {}
    if secret is not None:
        expires = int(time.time()) + 30 if expires is None else expires
        headers = {HDR_EXPIRES: str(expires), HDR_SIGNATURE: signature(secret, method, path, byte_range, expires)}
    if byte_range:
        headers["Range"] = byte_range
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_signed_request_gets_the_verified_blob_and_its_ranges(served):
    server, body, good = served["server"], served["body"], served["good"]
    client = PeerClient("n1", server.address, SECRET)
    assert client.has(good)
    assert client.read(good, 1000, 70_000) == body[1000:70_000]
    assert raw(server, "GET", f"/blobs/{good}") == (200, body)


def test_requests_without_the_secret_with_a_wrong_one_or_expired_are_refused(served):
    server, good = served["server"], served["good"]
    assert raw(server, "GET", f"/blobs/{good}", secret=None)[0] == 403
    assert raw(server, "GET", f"/blobs/{good}", secret="not-the-secret")[0] == 403
    assert raw(server, "GET", f"/blobs/{good}", expires=int(time.time()) - 5)[0] == 403
    assert raw(server, "GET", f"/blobs/{good}", expires=int(time.time()) + 3600)[0] == 403  # a replayable key
    with pytest.raises(PeerError, match="FLEET_PEER_SECRET"):
        PeerClient("n1", server.address, "not-the-secret").has(good)


def test_a_signature_covers_the_range_it_was_made_for(served):
    server, good = served["server"], served["good"]
    expires = int(time.time()) + 30
    sig = signature(SECRET, "GET", f"/blobs/{good}", "bytes=0-9", expires)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", f"/blobs/{good}", headers={HDR_EXPIRES: str(expires), HDR_SIGNATURE: sig,
                                                    "Range": "bytes=0-99999"})
    assert conn.getresponse().status == 403
    conn.close()


def test_paths_temp_files_and_quarantined_blobs_are_never_served(served):
    server, store, partial, quarantined = served["server"], served["store"], served["partial"], served["quarantined"]
    for path in [f"/tmp/{partial}.123.abcd1234.incomplete", f"/blobs/../tmp/{partial}.partial",
                 f"/blobs/{partial}.partial", f"/blobs/{quarantined}", "/blobs/../../etc/passwd",
                 f"/blobs/{served['good']}?x=1", f"/quarantine/{quarantined}", "/"]:
        status, _ = raw(server, "GET", path)
        assert status == 404, path
    assert not PeerClient("n1", server.address, SECRET).has(quarantined)
    assert not PeerClient("n1", server.address, SECRET).has(partial)
    assert list((store.root / "quarantine").iterdir()) and list(store.tmp.iterdir())  # they exist, unserved


def test_a_range_outside_the_blob_is_refused(served):
    server, good, body = served["server"], served["good"], served["body"]
    assert raw(server, "GET", f"/blobs/{good}", f"bytes=0-{len(body)}")[0] == 416
    with pytest.raises(PeerError):
        PeerClient("n1", server.address, SECRET).read(good, len(body) - 10, len(body) + 10)


def test_the_server_binds_only_the_configured_address_and_is_off_without_a_secret(tmp_path):
    on = FleetSettings(home=tmp_path, peer_secret=SECRET, peer_address="127.0.0.1", peer_port=0, node_name="n1")
    server = start_peer_server(on)
    try:
        host, port = server.bound
        assert host == "127.0.0.1" and port > 0
        assert server.address == f"127.0.0.1:{port}"
    finally:
        server.stop()
    off = FleetSettings(home=tmp_path, peer_port=0, node_name="n1")
    assert start_peer_server(off) is None and peer_source(off, None) is None
    disabled = FleetSettings(home=tmp_path, peer_secret=SECRET, peer_enabled=False, peer_port=0, node_name="n1")
    assert start_peer_server(disabled) is None
    with pytest.raises(ValueError, match="FLEET_PEER_SECRET"):
        PeerServer(SnapshotStore(tmp_path / "l2"), "")
