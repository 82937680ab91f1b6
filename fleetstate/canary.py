"""Automatic canary analysis: step a canary's share up (e.g. 10 → 25 → 50 → 100 %) while, over each window, its
failure rate and p95 total latency stay within bounds relative to the active release; roll it back by itself, with
the reason in `routes history`, when they do not.

The state lives in Redis (one hash per model), so the analysis survives the CLI that started it: a beat-driven task
(`warmfleet.canary_tick`, tasks/canary.py) calls `tick` every few seconds. One analysis per model at a time. The
figures are the fleet's own per-release counters (fleetstate/jobstats.py), which review jobs never touch."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from cachemgr.names import Release

from . import jobstats
from .queues import move_queued
from .routes import RouteError, RouteTable

ANALYSIS_KEY = "fleet:canary-analysis:{model}"  # hash: the model's analysis (see Analysis)
ANALYSIS_MODELS = "fleet:canary-analysis:models"  # set: models with a running analysis
TICK_LOCK = "fleet:lock:canary-tick"
ACTOR = "canary-analysis"


@dataclass(frozen=True)
class Bounds:
    window_s: float = 300.0
    steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)
    max_failure_delta: float = 0.02  # the canary's failure rate may exceed the active's by at most this
    max_p95_ratio: float = 1.5  # the canary's p95 total latency may be at most this times the active's…
    p95_slack_s: float = 0.25  # …plus this (tiny latencies jitter by more than any ratio)
    min_jobs: int = 5  # jobs the canary must have finished in a window before it is judged

    @classmethod
    def of(cls, settings: Any) -> Bounds:
        return cls(settings.canary_window_s, tuple(float(s) for s in str(settings.canary_steps).split(",") if s),
                   settings.canary_max_failure_delta, settings.canary_max_p95_ratio, settings.canary_p95_slack_s,
                   settings.canary_min_jobs)


class AnalysisError(RuntimeError):
    """An analysis refused (one already runs for the model, or the route has no such canary)."""


def start(client: redis.Redis, model: str, release: str, bounds: Bounds, now: float | None = None) -> dict[str, Any]:
    """Begin analysing `release`, the canary of `model` now; refused while another analysis of the model runs."""
    now = time.time() if now is None else now
    route = RouteTable(client).get(model)
    if route.canary != str(Release.parse(release)):
        raise AnalysisError(f"{release} is not the canary of {model} (canary: {route.canary or '-'})")
    key = ANALYSIS_KEY.format(model=model)
    if client.hget(key, "state") == b"running":
        raise AnalysisError(f"an analysis of {model} already runs ({client.hget(key, 'release').decode()}); "
                            f"`warmfleet rollback {model}` or wait for it")
    state = {"model": model, "release": route.canary, "active": route.active or "", "state": "running",
             "share": f"{route.canary_weight:g}", "steps": ",".join(f"{s:g}" for s in bounds.steps),
             "started_at": repr(now), "reason": "", "finished_at": ""}
    state.update(_window(client, route.canary, route.active or "", now))
    with client.pipeline() as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=state)
        pipe.sadd(ANALYSIS_MODELS, model)
        pipe.execute()
    return read(client, model) or {}


def _window(client: redis.Redis, canary: str, active: str, now: float) -> dict[str, str]:
    return {"window_started": repr(now),
            "baseline": json.dumps({"canary": jobstats.read(client, canary).to_json(),
                                    "active": jobstats.read(client, active).to_json()})}


def read(client: redis.Redis, model: str) -> dict[str, Any] | None:
    raw = {k.decode(): v.decode() for k, v in client.hgetall(ANALYSIS_KEY.format(model=model)).items()}
    return raw or None


def analyses(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every model's analysis, running or last finished (for `warmfleet status`)."""
    out = {}
    for model in sorted(RouteTable(client).models()):
        found = read(client, model)
        if found:
            out[model] = found
    return out


def tick(client: redis.Redis, bounds: Bounds, move: Callable[[Any, Any], bool] | None = None,
         now: float | None = None) -> dict[str, str]:
    """Judge every running analysis once: model → what happened ("" for nothing). One tick at a time fleet-wide."""
    if not client.set(TICK_LOCK, "1", nx=True, px=max(1000, int(bounds.window_s * 1000))):
        return {}
    try:
        return {m.decode(): _judge(client, m.decode(), bounds, move, time.time() if now is None else now)
                for m in client.smembers(ANALYSIS_MODELS)}
    finally:
        client.delete(TICK_LOCK)


def _finish(client: redis.Redis, model: str, state: str, reason: str, now: float) -> str:
    with client.pipeline() as pipe:
        pipe.hset(ANALYSIS_KEY.format(model=model), mapping={"state": state, "reason": reason,
                                                              "finished_at": repr(now)})
        pipe.srem(ANALYSIS_MODELS, model)
        pipe.execute()
    return f"{state}: {reason}"


def _judge(client: redis.Redis, model: str, bounds: Bounds, move: Callable[[Any, Any], bool] | None, now: float) -> str:
    a = read(client, model)
    if not a or a.get("state") != "running":
        client.srem(ANALYSIS_MODELS, model)
        return ""
    table = RouteTable(client)
    route = table.get(model)
    canary, active = a["release"], a["active"]
    if route.canary != canary or route.active != active:
        return _finish(client, model, "abandoned", "the route was changed by hand", now)
    base = json.loads(a["baseline"])
    c = jobstats.read(client, canary).minus(jobstats.ReleaseStats.from_json(base["canary"]))
    r = jobstats.read(client, active).minus(jobstats.ReleaseStats.from_json(base["active"]))
    share = float(a["share"])
    figures = _figures(c, r)
    if c.jobs >= bounds.min_jobs and (c.failure_rate or 0) > (r.failure_rate or 0) + bounds.max_failure_delta:
        return _rollback(client, table, model, canary, active, f"failure rate above bound at {share:g}%: {figures}",
                         move, now)
    if now - float(a["window_started"]) < bounds.window_s:
        return ""
    if c.jobs < bounds.min_jobs:
        return ""  # not enough evidence yet: the window goes on until the canary has served enough jobs
    cp, rp = c.quantile(0.95), r.quantile(0.95)
    if cp is not None and rp is not None and cp > rp * bounds.max_p95_ratio + bounds.p95_slack_s:
        return _rollback(client, table, model, canary, active, f"p95 total latency above bound at {share:g}%: "
                         f"{figures}", move, now)
    following = [s for s in bounds.steps if s > share]
    if not following or following[0] >= 100:
        table.set_active(canary, actor=ACTOR, reason=f"canary-analysis: promoted after {share:g}% ({figures})")
        return _finish(client, model, "promoted", f"healthy at every step ({figures})", now)
    table.set_canary(canary, following[0], actor=ACTOR,
                     reason=f"canary-analysis: {share:g}% -> {following[0]:g}% ({figures})")
    client.hset(ANALYSIS_KEY.format(model=model), mapping={"share": f"{following[0]:g}",
                                                             **_window(client, canary, active, now)})
    return f"stepped to {following[0]:g}%"


def _rollback(client: redis.Redis, table: RouteTable, model: str, canary: str, active: str, reason: str,
              move: Callable[[Any, Any], bool] | None, now: float) -> str:
    try:
        table.clear_canary(model, actor=ACTOR, reason=f"canary-analysis rollback: {reason}")
    except RouteError as exc:
        reason = f"{reason}; the rollback failed: {exc}"
    if move is not None and active:
        move_queued(client, canary, active, move)  # unpinned jobs queued for the canary go to the active release
    return _finish(client, model, "rolled-back", reason, now)


def _figures(c: jobstats.ReleaseStats, r: jobstats.ReleaseStats) -> str:
    def one(s: jobstats.ReleaseStats) -> str:
        p95 = s.quantile(0.95)
        rate = s.failure_rate
        return (f"{s.jobs} jobs, failures {rate:.0%}" if rate is not None else f"{s.jobs} jobs") + \
            (f", p95 {p95:.2f}s" if p95 is not None else "")
    return f"canary {one(c)}; active {one(r)}"
