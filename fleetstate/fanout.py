"""Fleet-wide maintenance runs: one per name at a time, with each node's outcome.

A fleet-wide sync or audit is fanned out to every node's own queue. A second trigger while a run is in progress
(a beat that fires twice, an operator's retry) does nothing; once every node has answered — or the window has
passed — the next trigger runs again, so a node that failed never blocks the fleet's next run.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import redis

from .keys import FANOUT_KEY
from .locks import run_lock
from .scripts import FANOUT_MARK

PENDING = ("sent", "running")
"""Node states of a run still in progress; the others (ok, failed, skipped) are outcomes."""


@dataclass
class FanOutRun:
    name: str
    run: str
    started_at: float
    nodes: dict[str, dict] = field(default_factory=dict)  # node → {state, task_id, at, detail}

    def in_progress(self, window: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - self.started_at < window and any(n.get("state") in PENDING for n in self.nodes.values())

    def failed(self) -> list[str]:
        return sorted(node for node, n in self.nodes.items() if n.get("state") == "failed")


class FanOutRuns:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def current(self, name: str) -> FanOutRun | None:
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(FANOUT_KEY.format(name=name)).items()}
        if not raw.get("run"):
            return None
        nodes = {k[len("node:"):]: json.loads(v) for k, v in raw.items() if k.startswith("node:")}
        for node, entry in nodes.items():
            entry.setdefault("task_id", raw.get(f"task:{node}"))
        return FanOutRun(name, raw["run"], float(raw.get("started_at", 0)), dict(sorted(nodes.items())))

    def begin(self, name: str, nodes: list[str], window: float) -> FanOutRun | str:
        """A new run over `nodes`, or the reason there is none (a run in progress)."""
        with run_lock(self.redis, f"fan-out-begin:{name}", 30) as held:
            if not held:
                return f"{name} is being sent to every node right now"
            current = self.current(name)
            if current is not None and current.in_progress(window):
                waiting = [n for n, s in current.nodes.items() if s.get("state") in PENDING]
                return (f"{name} run {current.run} is in progress (waiting for {', '.join(waiting)}); "
                        f"a new one is sent once every node has answered or after {window / 60:.0f} minutes")
            run = FanOutRun(name, uuid.uuid4().hex[:12], time.time())
            run.nodes = {node: {"state": "sent", "at": run.started_at} for node in nodes}
            key = FANOUT_KEY.format(name=name)
            with self.redis.pipeline() as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping={"run": run.run, "started_at": repr(run.started_at),
                                        **{f"node:{n}": json.dumps(s) for n, s in run.nodes.items()}})
                pipe.execute()
            return run

    def sent(self, name: str, run: str, node: str, task_id: str) -> None:
        """The task id of a node's message (kept apart from its state, which the node may have written already)."""
        self.redis.hset(FANOUT_KEY.format(name=name), f"task:{node}", task_id)

    def mark(self, name: str, run: str | None, node: str, state: str, **detail: object) -> None:
        """A node's state in run `run`; ignored for a run that is no longer the current one."""
        if not run:
            return
        key = FANOUT_KEY.format(name=name)
        entry = json.dumps({"state": state, "at": time.time(), **detail})
        FANOUT_MARK(self.redis, [key], [run, f"node:{node}", entry])
