"""Automatic canary analysis with real workers: a canary whose pipeline calls fail is rolled back by the analysis (the
reason in `routes history`, no job lost), a healthy one reaches 100 %, and /metrics counts both releases' jobs."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
import redis

from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate import canary, jobstats
from fleetstate.routes import RouteTable

from .support import run_cli, start_worker, wait_for

pytestmark = pytest.mark.integration
OLD, NEW = DEMO_RELEASES
MODEL = OLD.split("@")[0]
DOOMED = "a doomed blue square"
QUICK = {"canary_window_s": 2.0, "canary_min_jobs": 3, "canary_max_p95_ratio": 3.0, "canary_p95_slack_s": 1.0,
         "canary_tick_s": 0.5}
ENV = {"FLEET_JOB_MAX_RETRIES": "0", "FLEET_FAILURE_BREAKER": "0"}


@pytest.fixture(scope="module")
def old_worker(fleet_settings, producer, tmp_path_factory):
    worker = start_worker(fleet_settings, [OLD], "c-old", tmp_path_factory.mktemp("logs"), **ENV)
    yield worker
    worker.stop()


def drive(settings, producer, client, prompt: str, until, limit: int = 200) -> list:
    """Send jobs one after another, running the analysis tick (beat's task body) between them, until `until()`."""
    from tasks.canary import run_tick

    sent = []
    for i in range(limit):
        sent.append(producer.generate.delay(prompt, seed=i, steps=2))
        run_tick(settings, client)
        if until():
            return sent
        time.sleep(0.15)
    raise AssertionError(f"analysis still {canary.read(client, MODEL)} after {limit} jobs")


def outcomes(sent: list) -> list[tuple[str, dict | Exception]]:
    out = []
    for r in sent:
        try:
            out.append(("ok", r.get(timeout=120)))
        except Exception as exc:  # noqa: BLE001 - a failed job's own error
            out.append(("failed", exc))
    return out


def scrape(settings) -> str:
    from fleetctl.metrics import serve_metrics

    stop = threading.Event()
    port = 19000 + (hash(str(settings.home)) % 800)
    thread = threading.Thread(target=serve_metrics, args=(settings, port, stop), daemon=True)
    thread.start()
    try:
        text = ""
        for _ in range(50):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.1)
        return text
    finally:
        stop.set()
        thread.join(timeout=20)


def test_a_failing_canary_is_rolled_back_by_the_analysis(fleet_settings, producer, old_worker, tmp_path):
    settings = fleet_settings.model_copy(update={**QUICK, "canary_steps": "50,100"})
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(jobstats.JOBSTATS_KEY.format(release=OLD), jobstats.JOBSTATS_KEY.format(release=NEW))
    bad = start_worker(settings, [NEW], "c-bad", tmp_path, WARMFLEET_TEST_POISON_PROMPT=DOOMED, **ENV)
    try:
        table = RouteTable(client)
        table.set_active(OLD, actor="test")
        env = {f"FLEET_{k.upper()}": str(v) for k, v in QUICK.items()} | {"FLEET_CANARY_STEPS": "50,100"}
        result = run_cli(settings, "promote", MODEL, NEW, "--canary", "50", "--analyze", env=env)
        assert result.exit_code == 0, result.output
        assert "analysing" in result.output
        again = run_cli(settings, "promote", MODEL, NEW, "--canary", "50", "--analyze", env=env)
        assert again.exit_code == 1 and "already runs" in again.output  # one analysis per model

        sent = drive(settings, producer, client, DOOMED, lambda: canary.read(client, MODEL)["state"] != "running")
        analysis = canary.read(client, MODEL)
        assert analysis["state"] == "rolled-back", analysis
        route = table.get(MODEL)
        assert route.active == OLD and route.canary is None
        entry = table.history(MODEL, count=1)[0]
        assert entry["actor"] == "canary-analysis" and entry["reason"].startswith("canary-analysis rollback: failure")
        status = run_cli(settings, "status")
        assert f"canary analysis of {NEW}: rolled-back" in status.output

        after = [producer.generate.delay(DOOMED, seed=1000 + i, steps=2) for i in range(4)]
        done = outcomes(sent + after)
        assert len(done) == len(sent) + len(after)  # every job answered: none lost
        failed = [o for kind, o in done if kind == "failed"]
        served = [o for kind, o in done if kind == "ok"]
        assert failed and all(o["release"] == OLD for o in served)
        assert all(kind == "ok" for kind, _ in done[len(sent):])  # after the rollback, every job goes to OLD

        text = scrape(settings)
        assert f'warmfleet_jobs_served_total{{model="{MODEL}",release="{OLD}"}} {float(len(served))}' in text
        assert (f'warmfleet_jobs_failed_total{{model="{MODEL}",reason="other",release="{NEW}"}} '
                f'{float(len(failed))}') in text
        assert f'warmfleet_job_total_seconds_count{{model="{MODEL}",release="{OLD}"}} {float(len(served))}' in text
    finally:
        bad.stop()


def test_a_healthy_canary_reaches_100_percent(fleet_settings, producer, old_worker, tmp_path):
    settings = fleet_settings.model_copy(update={**QUICK, "canary_min_jobs": 1})
    client = redis.Redis.from_url(settings.broker_url)
    good = start_worker(settings, [NEW], "c-good", tmp_path, **ENV)
    try:
        table = RouteTable(client)
        table.set_active(OLD, actor="test")
        table.set_canary(NEW, 10, actor="test")
        canary.start(client, MODEL, NEW, canary.Bounds.of(settings))
        shares = set()

        def finished() -> bool:
            a = canary.read(client, MODEL)
            shares.add(a["share"])
            return a["state"] != "running"

        sent = drive(settings, producer, client, "a healthy red circle", finished, limit=400)
        analysis = canary.read(client, MODEL)
        assert analysis["state"] == "promoted", analysis
        assert shares == {"10", "25", "50"}  # every step taken, in order of the settings
        assert table.get(MODEL).active == NEW and table.get(MODEL).canary is None
        reasons = [e["reason"] for e in reversed(table.history(MODEL, count=3))]
        assert [r.split(" (")[0] for r in reasons] == ["canary-analysis: 10% -> 25%", "canary-analysis: 25% -> 50%",
                                                       "canary-analysis: promoted after 50%"]
        assert all(kind == "ok" for kind, _ in outcomes(sent))
        wait_for(lambda: jobstats.read(client, NEW).served > 0, 10, "canary's jobs counted")
    finally:
        good.stop()
