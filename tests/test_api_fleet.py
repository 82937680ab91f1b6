"""A local fleet in which every process logs in to Redis as its own role (fleetstate/acl.py), and its HTTP API
(fleetctl/api.py, the producer role) used as a client in any language would: one fleet for the whole module.

Roles end to end: jobs are served, an operator rolls back, syncs and audits the fleet, and the server's ACL LOG shows
no refusal of any fleet process; a producer's promote fails in one line naming the role. The API: a job in, its
result and image out; bad input is 422 with the producer's one line; a wrong or missing key is 401; past the rate
limit 429; past the queued cap 429; an expired image URL 403; the README's curl script works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from fleetctl.apikeys import ApiKeys, UrlSigner
from fleetctl.demo.builders import DEMO_RELEASES
from fleetctl.localfleet import LocalFleet
from fleetstate.acl import PROCESS_ROLES, url_role
from tasks.requests import BadRequest, GenerateRequest
from tasks.settings import FleetSettings, offline_environment

REPO = Path(__file__).resolve().parents[1]
PREVIOUS, ACTIVE = DEMO_RELEASES


@pytest.fixture(scope="module")
def fleet(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    settings = FleetSettings(home=home, archive_url=demo_archive_dir.as_uri(), torch_threads=1, node_name="rolenode",
                             api_port=0, api_max_queued=2, api_burst=30, api_rate_per_minute=60)
    local = LocalFleet(settings, log=lambda *_: None)
    state = local.up(list(DEMO_RELEASES), None, flower=False, beat=True)
    keys = ApiKeys(settings.resolved_api_keys_file)
    try:
        yield settings, state, {name: keys.add(name) for name in ("studio", "flood", "burst", "curl")}
    finally:
        local.down(state)


def call(url: str, key: str | None = None, body: object | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw, status, head = resp.read(), resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        raw, status, head = exc.read(), exc.code, {k.lower(): v for k, v in exc.headers.items()}
    return status, (json.loads(raw) if head.get("content-type", "").startswith("application/json") else {"raw": raw}), head


def cli(settings: FleetSettings, url: str, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_HOME": str(settings.home), "FLEET_ARCHIVE_URL": settings.archive_url or "",
                "FLEET_NODE_NAME": "rolenode", "FLEET_BROKER_URL": url, "PYTHONPATH": str(REPO)})
    offline_environment(env)
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def generate(state, key: str, **body: object) -> dict:
    status, answer, _ = call(f"{state.api_url}/v1/generations", key, {"prompt": "a red circle", **body})
    assert status == 202, answer
    status, done, _ = call(f"{state.api_url}/v1/generations/{answer['id']}?wait=30", key)
    assert status == 200 and done["status"] == "succeeded", done
    return done


def test_every_process_logs_in_as_its_own_role(fleet):
    _, state, _ = fleet
    for proc in state.procs:
        if proc.name in ("redis",):
            continue
        env = dict(line.split("=", 1) for line in Path(f"/proc/{proc.pid}/environ").read_bytes().decode()
                   .split("\0") if "=" in line)
        expected = PROCESS_ROLES["worker" if proc.name.startswith("worker-") else proc.name]
        assert url_role(env["FLEET_BROKER_URL"]) == expected, proc.name


def test_a_job_in_its_result_and_image_out(fleet):
    _, state, keys = fleet
    done = generate(state, keys["studio"], seed=11)
    assert done["result"]["release"] == ACTIVE and done["result"]["seed"] == 11
    assert "image_uri" not in done["result"]
    status, image, head = call(done["image_url"])
    assert status == 200 and head["content-type"] == "image/png" and image["raw"].startswith(b"\x89PNG")


def test_an_operator_rolls_back_syncs_and_audits_and_no_process_was_refused(fleet):
    settings, state, keys = fleet
    admin = redis.Redis.from_url(state.broker_url)
    for argv in (["rollback", "nano-banana"], ["sync", "--fleet", "--timeout", "240"],
                 ["audit", "--fleet", "--timeout", "240"]):
        done = cli(settings, state.roles["operator"], *argv)
        assert done.returncode == 0, done.stdout + done.stderr
    assert generate(state, keys["studio"])["result"]["release"] == PREVIOUS
    assert cli(settings, state.roles["monitoring"], "status").returncode == 0
    refused = [{k.decode(): v for k, v in e.items() if k in (b"username", b"object", b"reason")}
               for e in admin.execute_command("ACL", "LOG", "100")]
    assert not refused, refused


def test_a_producer_may_not_promote(fleet):
    settings, state, _ = fleet
    done = cli(settings, state.roles["producer"], "promote", "nano-banana", ACTIVE)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "the producer role may not" in done.stderr, done.stderr


def test_bad_input_is_422_with_the_producers_one_line(fleet):
    _, state, keys = fleet
    with pytest.raises(BadRequest) as expected:
        GenerateRequest.parse(prompt="x", steps=0)
    status, answer, _ = call(f"{state.api_url}/v1/generations", keys["studio"], {"prompt": "x", "steps": 0})
    assert status == 422 and answer == {"error": str(expected.value)}
    status, answer, _ = call(f"{state.api_url}/v1/generations", keys["studio"], ["not", "an", "object"])
    assert status == 422 and "\n" not in answer["error"]


def test_a_wrong_or_missing_key_is_401(fleet):
    _, state, keys = fleet
    for key in (None, keys["studio"] + "x", "wf_studio_guessed"):
        status, answer, head = call(f"{state.api_url}/v1/generations", key, {"prompt": "x"})
        assert status == 401 and head.get("www-authenticate") == "Bearer", answer


def test_a_key_sees_only_its_own_jobs(fleet):
    _, state, keys = fleet
    status, answer, _ = call(f"{state.api_url}/v1/generations", keys["studio"], {"prompt": "mine"})
    assert status == 202
    assert call(f"{state.api_url}/v1/generations/{answer['id']}", keys["curl"])[0] == 404


def test_past_the_rate_limit_is_429(fleet):
    _, state, keys = fleet
    statuses = [call(f"{state.api_url}/v1/generations/{'0' * 8}-0000-0000-0000-{'0' * 12}", keys["flood"])
                for _ in range(40)]
    limited = [s for s in statuses if s[0] == 429]
    assert limited and all(s[0] == 404 for s in statuses[:30]), [s[0] for s in statuses]
    assert int(limited[0][2]["retry-after"]) >= 1


def test_past_the_queued_cap_is_429(fleet):
    _, state, keys = fleet
    answers = [call(f"{state.api_url}/v1/generations", keys["burst"], {"prompt": f"job {i}", "steps": 20})
               for i in range(3)]
    assert [a[0] for a in answers] == [202, 202, 429], answers
    assert "at most 2" in answers[2][1]["error"]


def test_an_expired_image_url_is_403(fleet):
    _, state, keys = fleet
    done = generate(state, keys["studio"])
    api = next(p for p in state.procs if p.name == "api")
    secret = dict(line.split("=", 1) for line in Path(f"/proc/{api.pid}/environ").read_bytes().decode().split("\0")
                  if "=" in line)["FLEET_API_URL_SECRET"]
    expires, sig = UrlSigner(secret, 60).sign(done["id"], now=time.time() - 3600)
    status, answer, _ = call(f"{state.api_url}/v1/images/{done['id']}.png?expires={expires}&sig={sig}")
    assert status == 403 and "expired" in answer["error"]
    forged = done["image_url"].replace("sig=", "sig=0")
    assert call(forged)[0] == 403


def test_the_openapi_document_describes_the_api(fleet):
    _, state, _ = fleet
    status, doc, _ = call(f"{state.api_url}/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/generations", "/v1/generations/{id}", "/v1/images/{id}.png"} <= set(doc["paths"])
    assert "prompt" in doc["components"]["schemas"]["GenerateRequest"]["properties"]


def test_the_readme_curl_script_works(fleet, tmp_path: Path):
    _, state, keys = fleet
    done = subprocess.run(["sh", str(REPO / "docs" / "api-example.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "WARMFLEET_API": state.api_url, "WARMFLEET_KEY": keys["curl"]}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status":"succeeded"' in done.stdout
    assert next(tmp_path.glob("*.png")).read_bytes().startswith(b"\x89PNG")
