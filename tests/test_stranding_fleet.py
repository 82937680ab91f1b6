"""An operator cannot strand a job (issue 29): what a live fleet answers to each wrong input, and that no job waits
without `warmfleet status` saying so. One fleet for the module: a private archive (the demo models plus LoRA v2.4.0
for the active base), worker `w-new` on base v1.1.0 + LoRA v2.3.1 and `w-old` on base v1.0.0 + LoRA v2.3.0; the
producer caches nothing, so every send reads the route and the catalog. The tests run in order on that fleet, each
leaving the route at OLD → NEW."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from safetensors.torch import load_file, save_file

from cachemgr import LocalArchive
from cachemgr.names import ComponentRef, queue_for
from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES, SINGLE_FILE_CHECKPOINT, build_lora, build_sdxl
from fleetctl.localfleet import free_port, wait_port
from fleetstate.keys import queue_lists
from fleetstate.live import LiveWarms
from fleetstate.queues import queue_depth
from fleetstate.registry import WarmRegistry
from fleetstate.routes import RouteTable
from tasks.errors import JobRefused

from .support import REPO, child_env, fleet_settings_for, run_cli, start_worker, wait_for, wait_warm

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES  # base v1.0.0 + LoRA v2.3.0 (w-old); base v1.1.0 + LoRA v2.3.1 (w-new)
COLD = f"{DEMO_MODEL}@base-v1.0.0+lora-v2.3.1"  # both versions archived; no worker holds the combination
LIVE = f"{DEMO_MODEL}@base-v1.1.0+lora-v2.4.0"  # a new LoRA version for w-new's base, warmed live
BAD = f"{DEMO_MODEL}@base-v9.9.9+lora-v9.9.9"  # files not in the archive
TYPO = f"{DEMO_MODEL}@base-v1.0.0+lora-v2.3.9"  # a pinned release with a typo in its LoRA version
W_NEW, W_OLD = "w-new@testnode", "w-old@testnode"
SMALL = {"width": 16, "height": 16, "steps": 1}


@pytest.fixture(scope="module")
def archive_dir(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive") / "archive"
    shutil.copytree(demo_archive_dir, root)
    work = tmp_path_factory.mktemp("build")
    base = build_sdxl(work / "base", 1100)
    LocalArchive(root).publish(ComponentRef(DEMO_MODEL, "lora", "v2.4.0"), build_lora(base, "sdxl", work / "lora", 2400),
                               meta={"family": "sdxl"})
    return root


@pytest.fixture(scope="module")
def fleet_settings(redis_server, archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, archive_dir)


@pytest.fixture(scope="module")
def fleet(fleet_settings, producer, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("logs")
    workers = {"new": start_worker(fleet_settings, [NEW], "w-new", logs, wait=False),
               "old": start_worker(fleet_settings, [OLD], "w-old", logs, wait=False)}
    try:
        for w in workers.values():
            wait_warm(fleet_settings, w)
        client = redis.Redis.from_url(fleet_settings.broker_url)
        table = RouteTable(client)
        table.set_active(OLD, actor="test")
        table.set_active(NEW, actor="test")
        yield {"client": client, "table": table, "registry": WarmRegistry(client), "workers": workers, "logs": logs}
    finally:
        for w in workers.values():
            w.stop()


def cli(settings, *args: str, input: str | None = None):  # noqa: ANN201 - click's Result
    return run_cli(settings, *args, input=input)


def one_line_error(result) -> str:  # noqa: ANN001 - click's Result
    """The error a refused command printed: exit 1, one line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def stranded_lines(settings) -> list[str]:
    status = cli(settings, "status")
    assert status.exit_code == 0, status.output
    return [line for line in status.output.splitlines() if line.startswith("STRANDED ")]


def back_to_new(fleet) -> None:
    """The route as every test starts and ends: OLD then NEW on the stack, no job waiting anywhere unseen."""
    table: RouteTable = fleet["table"]
    if table.active(DEMO_MODEL) != NEW or [e.release for e in table.stack(DEMO_MODEL)][-2:] != [OLD, NEW]:
        table.set_active(OLD, actor="test")
        table.set_active(NEW, actor="test")


# 1. a forced promote of files the archive lacks; a forced promote of a cold release; stranded jobs shown and moved
def test_forced_promotes_either_refuse_or_say_what_waits_and_stranded_jobs_are_shown_and_moved(fleet_settings,
                                                                                                producer, fleet):
    table, client = fleet["table"], fleet["client"]
    refused = cli(fleet_settings, "promote", DEMO_MODEL, BAD, "--force")
    line = one_line_error(refused)
    assert f"refusing to promote {BAD}: the archive has no {DEMO_MODEL}/base/v9.9.9, {DEMO_MODEL}/lora/v9.9.9" in line
    assert "--force does not route" in line
    assert table.active(DEMO_MODEL) == NEW

    forced = cli(fleet_settings, "promote", DEMO_MODEL, COLD, "--force")
    assert forced.exit_code == 0, forced.output
    assert f"forced: no worker is warm on {COLD}: 0 job(s) already queued for it and every new job routed to it " \
           f"wait in {queue_for(COLD)}" in forced.output
    waiting = [producer.generate.delay(f"sent while forced {i}", seed=i, **SMALL) for i in range(3)]
    assert queue_depth(client, queue_for(COLD)) == 3
    [stranded] = stranded_lines(fleet_settings)
    assert "3 job(s) waiting up to" in stranded and f"on {COLD}: no warm worker, routed (active)" in stranded

    back = cli(fleet_settings, "rollback", DEMO_MODEL)
    assert back.exit_code == 0 and table.active(DEMO_MODEL) == NEW, back.output
    [stranded] = stranded_lines(fleet_settings)  # still waiting after the rollback, and still shown
    assert "3 job(s) waiting up to" in stranded and "routed by nothing" in stranded
    assert f"warmfleet move-queued {COLD} <release>" in stranded

    refused_move = cli(fleet_settings, "move-queued", COLD, BAD)
    assert "the archive has no" in one_line_error(refused_move)
    moved = cli(fleet_settings, "move-queued", COLD, NEW)
    assert moved.exit_code == 0 and f"moved 3 job(s) from {COLD} to {NEW}, task ids kept" in moved.output, moved.output
    results = [r.get(timeout=300) for r in waiting]
    assert [(res["task_id"], res["release"]) for res in results] == [(r.id, NEW) for r in waiting]
    assert stranded_lines(fleet_settings) == []
    back_to_new(fleet)


# 2. a producer pins a release the archive does not hold
def test_a_job_pinned_to_a_release_the_archive_lacks_is_refused_before_it_is_queued(fleet_settings, producer, fleet):
    with pytest.raises(JobRefused) as refused:
        producer.generate.delay("a red circle", release=TYPO)
    assert f"no worker can ever serve {TYPO}: the archive has no {DEMO_MODEL}/lora/v2.3.9" in str(refused.value)
    assert not any(fleet["client"].exists(name) for name in queue_lists(queue_for(TYPO)))
    line = one_line_error(cli(fleet_settings, "generate", "a red circle", "--release", TYPO))
    assert f"the archive has no {DEMO_MODEL}/lora/v2.3.9" in line
    # a pinned release the archive holds is still taken, and `status` shows it waiting while nothing serves it
    pinned = producer.generate.delay("pinned to a cold release", release=COLD, **SMALL)
    [stranded] = stranded_lines(fleet_settings)
    assert "1 job(s) waiting up to" in stranded and COLD in stranded
    kept = cli(fleet_settings, "move-queued", COLD, OLD)
    assert "moved 0 job(s)" in kept.output and "1 pinned to it (--include-pinned moves them" in kept.output
    repinned = cli(fleet_settings, "move-queued", COLD, OLD, "--include-pinned")
    assert f"moved 1 job(s) from {COLD} to {OLD}, task ids kept (1 re-pinned to {OLD})" in repinned.output
    assert pinned.get(timeout=300)["release"] == OLD
    assert stranded_lines(fleet_settings) == []


# 3. rollback twice goes further back, never forward; a forced cold release is passed over
def test_a_second_rollback_goes_further_back_and_skips_a_forced_cold_release(fleet_settings, fleet):
    table = fleet["table"]
    back_to_new(fleet)
    assert cli(fleet_settings, "promote", DEMO_MODEL, COLD, "--force").exit_code == 0
    assert cli(fleet_settings, "promote", DEMO_MODEL, NEW).exit_code == 0  # stack … OLD NEW COLD NEW
    first = cli(fleet_settings, "rollback", DEMO_MODEL)
    assert first.exit_code == 0 and table.active(DEMO_MODEL) == OLD, first.output  # NEW again would be forward
    assert f"passed over: {COLD} (no warm worker)" in first.output
    second = cli(fleet_settings, "rollback", DEMO_MODEL)
    assert table.active(DEMO_MODEL) == OLD
    assert f"{DEMO_MODEL} has no earlier release to roll back to" in one_line_error(second)
    history = cli(fleet_settings, "routes", "history", DEMO_MODEL)
    assert history.exit_code == 0
    stack_lines = history.output.split("changes, newest first:")[0].splitlines()
    assert f"  active  {OLD}" in "\n".join(stack_lines) and COLD not in "\n".join(stack_lines)
    back_to_new(fleet)


# 5. a LoRA release warmed live survives a restart of its worker, so the route can keep naming it
def test_a_live_warmed_release_is_warmed_again_when_its_worker_restarts(fleet_settings, fleet):
    table, registry = fleet["table"], fleet["registry"]
    warmed = cli(fleet_settings, "warm", LIVE, "--on", "w-new", "--timeout", "300")
    assert warmed.exit_code == 0, warmed.output
    assert f"{W_NEW}: warm on {LIVE} (its LoRA v2.4.0: " in warmed.output  # the new LoRA's own size …
    assert "the worker's LoRA layers now" in warmed.output  # … not the worker's total as if it were the LoRA's
    assert W_NEW in LiveWarms(fleet["client"]).all()[LIVE]["workers"]
    assert cli(fleet_settings, "promote", DEMO_MODEL, LIVE).exit_code == 0  # stack … NEW LIVE

    worker = fleet["workers"]["new"]
    worker.stop()
    restarted = start_worker(fleet_settings, [NEW], "w-new", fleet["logs"])  # configured with NEW only, as before
    fleet["workers"]["new"] = restarted
    wait_for(lambda: W_NEW in registry.warm_workers(LIVE).get(LIVE, []), timeout=300,
             what=f"{LIVE} warm again on the restarted worker")
    assert registry.worker(W_NEW).loads == 1  # one base load: the LoRA went in beside it
    assert "L1_REWARM" in Path(fleet_settings.event_log_path).read_text()
    rolled = cli(fleet_settings, "rollback", DEMO_MODEL)
    assert rolled.exit_code == 0 and table.active(DEMO_MODEL) == NEW, rolled.output
    assert cli(fleet_settings, "promote", DEMO_MODEL, LIVE).exit_code == 0  # warm again: no --force needed


# 4. retire --force of the active release says what it leaves unserved and asks
def test_retiring_the_active_release_asks_first_and_its_jobs_stay_visible(fleet_settings, producer, fleet):
    table, registry, client = fleet["table"], fleet["registry"], fleet["client"]
    if table.active(DEMO_MODEL) != LIVE:  # as the previous test leaves it
        assert cli(fleet_settings, "warm", LIVE, "--on", "w-new").exit_code == 0
        assert cli(fleet_settings, "promote", DEMO_MODEL, LIVE).exit_code == 0
    refused = cli(fleet_settings, "retire", LIVE, "--everywhere")
    assert "refusing to retire" in one_line_error(refused) and "routed (active)" in refused.output

    unanswered = cli(fleet_settings, "retire", LIVE, "--everywhere", "--force")
    assert unanswered.exit_code == 1, unanswered.output
    assert f"warning: retiring {LIVE} from {W_NEW} leaves no worker warm on it: every new job of {DEMO_MODEL} " \
           "will wait unserved (it is the active release)" in unanswered.output
    assert "not retired: no answer; pass --yes" in unanswered.output
    declined = cli(fleet_settings, "retire", LIVE, "--everywhere", "--force", input="n\n")
    assert declined.exit_code == 1 and registry.is_warm(LIVE), declined.output

    retired = cli(fleet_settings, "retire", LIVE, "--everywhere", "--force", "--yes")
    assert retired.exit_code == 0 and f"{W_NEW}: retired {LIVE}" in retired.output, retired.output
    assert not registry.is_warm(LIVE) and LIVE not in LiveWarms(client).all()  # a restart will not warm it again
    job = producer.generate.delay("sent to the retired active release", **SMALL)
    [stranded] = stranded_lines(fleet_settings)
    assert "1 job(s) waiting up to" in stranded and f"on {LIVE}: no warm worker, routed (active)" in stranded
    assert cli(fleet_settings, "rollback", DEMO_MODEL, "--move-queued").exit_code == 0
    assert job.get(timeout=300)["release"] == NEW
    assert stranded_lines(fleet_settings) == []
    back_to_new(fleet)


# 7. smaller: publish --dry-run of an existing version, versions with a typo, a checkpoint without text encoders
def test_archive_commands_refuse_in_one_line(fleet_settings, archive_dir, tmp_path):
    existing = archive_dir / DEMO_MODEL / "lora" / "v2.4.0"
    lora_file = next(p for p in existing.rglob("*.safetensors"))
    for extra in (["--dry-run"], []):
        line = one_line_error(cli(fleet_settings, "publish", DEMO_MODEL, "lora", "v2.4.0", str(lora_file), *extra))
        assert f"{DEMO_MODEL}/lora/v2.4.0 is already published" in line and "publish it as a new version" in line
    typo = cli(fleet_settings, "versions", "nano-banan")
    assert "has no model 'nano-banan'; it holds" in one_line_error(typo) and DEMO_MODEL in typo.output
    listed = cli(fleet_settings, "versions", DEMO_MODEL)
    assert listed.exit_code == 0 and f"{DEMO_MODEL}/lora/v2.4.0" in listed.output

    from fleetctl.demo.builders import build_single_file
    from workers.models.original_layout import CLIP_PREFIX

    folder = build_single_file(tmp_path / "single", seed=77)
    checkpoint = folder / SINGLE_FILE_CHECKPOINT
    embedding = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
    tensors = {k: v for k, v in load_file(checkpoint).items() if k != embedding}
    stripped = tmp_path / "no-token-embedding.safetensors"
    save_file(tensors, stripped)
    line = one_line_error(cli(fleet_settings, "publish", "pixel-single", "base", "v9.0.0", str(stripped),
                              "--config", str(folder / "config"), "--dry-run"))
    assert f"it lacks its text_encoder's token embedding ({embedding}), which a sd checkpoint carries" in line
    assert "none wide" not in line


# 7. smaller: Flower's API answers a bad generate request with 400 and the reason, not an empty 500
def test_flower_answers_a_bad_generate_request_with_its_reason(fleet_settings, producer, fleet, tmp_path):
    port = free_port()
    env = child_env(fleet_settings, FLOWER_BASIC_AUTH="admin:s3cret")
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "flower", "--address=127.0.0.1", f"--port={port}"],
                            env=env, cwd=REPO, stdout=open(tmp_path / "flower.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    token = base64.b64encode(b"admin:s3cret").decode()

    def post(body: dict, auth: bool = True) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/task/async-apply/warmfleet.generate",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Basic {token}"} if auth else {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        wait_port(port, timeout=60)
        assert post({"kwargs": {"prompt": "x", "release": TYPO}}, auth=False)[0] == 401  # auth comes first
        code, body = post({"kwargs": {"prompt": "x", "release": TYPO}})
        assert code == 400 and f"the archive has no {DEMO_MODEL}/lora/v2.3.9" in body and "\n" not in body.strip()
        code, body = post({"kwargs": {"prompt": "x", "steps": 0}})
        assert code == 400 and "steps must be between 1 and 150, got 0" in body
        code, body = post({"args": ["a red circle"], "kwargs": {"seed": 5, **SMALL}})
        assert code == 200, body
        task_id = json.loads(body)["task-id"]
        assert producer.app.AsyncResult(task_id).get(timeout=300)["task_id"] == task_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
