"""`warmfleet up` with TLS (FLEET_LOCAL_TLS / `up --tls`): Redis listens for TLS only, with a CA and certificate made
by `up` (fleetctl/localtls.py); every process connects with rediss:// as its own role and verifies the server.
A job is served (by a Python producer and through the HTTP API), a plain-text client and a client trusting another
CA are refused."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from fleetctl.apikeys import ApiKeys
from fleetctl.demo.builders import DEMO_RELEASES
from fleetctl.localfleet import LocalFleet
from fleetctl.localtls import make_certificates
from tasks.settings import FleetSettings


@pytest.fixture(scope="module")
def tls_fleet(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    settings = FleetSettings(home=home, archive_url=demo_archive_dir.as_uri(), torch_threads=1, node_name="tlsnode",
                             local_tls=True, api_port=0)
    fleet = LocalFleet(settings, log=lambda *_: None)
    state = fleet.up([DEMO_RELEASES[1]], None, flower=False, beat=True)
    try:
        yield settings, state
    finally:
        fleet.down(state)


def test_every_role_url_is_rediss_and_verifies_the_server(tls_fleet):
    _, state = tls_fleet
    for url in [state.broker_url, *state.roles.values()]:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        assert parts.scheme == "rediss" and query["ssl_cert_reqs"] == ["required"] and query["ssl_ca_certs"]


def test_a_tls_fleet_serves_a_job(tls_fleet):
    import tasks

    settings, state = tls_fleet
    tasks.configure(settings.model_copy(update={"broker_url": state.roles["producer"]}))
    result = tasks.generate.delay("a red circle", seed=3).get(timeout=120)
    assert result["release"] == DEMO_RELEASES[1]
    key = ApiKeys(settings.resolved_api_keys_file).add("tls")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    req = urllib.request.Request(f"{state.api_url}/v1/generations", data=b'{"prompt": "a blue square"}',
                                 headers=headers)
    job = json.loads(urllib.request.urlopen(req, timeout=30).read())
    done = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{state.api_url}/v1/generations/{job['id']}?wait=30", headers=headers), timeout=60).read())
    assert done["status"] == "succeeded", done


def test_plain_text_and_a_wrong_ca_are_refused(tls_fleet, tmp_path: Path):
    _, state = tls_fleet
    parts = urlsplit(state.roles["monitoring"])
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=parts.port, username=parts.username, password=parts.password,
                    socket_timeout=5).ping()
    ca = parse_qs(parts.query)["ssl_ca_certs"][0]
    other = make_certificates(tmp_path / "other")
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(state.roles["monitoring"].replace(ca, str(other)), socket_timeout=5).ping()
    assert redis.Redis.from_url(state.roles["monitoring"]).ping()
