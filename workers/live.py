"""New LoRA versions on a running worker: loaded beside the others between two jobs, never a new process.

`warmfleet warm` / `retire` send a Celery control command to chosen workers (`fleet_warm`, `fleet_retire`). The
handler only checks and answers (a wrong base or a full budget is refused at once, in one line); the L2 sync runs
on a thread of its own (the same verified code as beat's), and every change to the pipeline — loading or deleting
an adapter, adding or cancelling a queue consumer, announcing — is a step queued for the worker's event loop, which
runs it from a timer. A solo-pool worker runs its jobs inside that same loop, so a step always falls between two
jobs and never beside a pipeline call: serving pauses for one adapter load at most.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker.control import control_command

from cachemgr import Archive, EventLog, Release, SnapshotStore
from cachemgr.names import InvalidName, queue_for
from cachemgr.sync import sync_release
from fleetstate.live import LiveWarms, reasons_to_keep
from fleetstate.registry import WarmRegistry, WorkerState
from tasks.prewarm import RETIRE_COMMAND, WARM_COMMAND

from .models.base import adapter_name, load_adapter, shared_base_key
from .resident import ResidentPipeline
from .runtime import WorkerRuntime

log = logging.getLogger("warmfleet.worker")
DRAIN_SECONDS = 0.05


class Refused(ValueError):
    """A warm or retire this worker will not do; the message is the one line the operator sees."""


class LiveAdapters:
    """The worker's side of `warmfleet warm` and `retire`; steps run only in the event loop (`drain`)."""

    def __init__(self, runtime: WorkerRuntime, registry: WarmRegistry, archive: Archive, store: SnapshotStore,
                 events: EventLog | None = None, max_adapters: int = 0, max_adapter_bytes: int = 0) -> None:
        self.runtime = runtime
        self.registry = registry
        self.archive = archive
        self.store = store
        self.events = events
        self.max_adapters = max_adapters  # 0: no bound
        self.max_adapter_bytes = max_adapter_bytes
        self.consumer: Any = None  # Celery's consumer, set when the event loop starts (LiveAdapterStep)
        self.steps: queue.Queue[Callable[[], None]] = queue.Queue()
        self.busy: set[str] = set()  # releases being warmed now

    @property
    def state(self) -> WorkerState:
        return self.runtime.state

    # -- requests (control-command handlers: the event loop, between jobs; they only check and schedule)
    def request_warm(self, release: str, ticket: str) -> dict[str, str]:
        try:
            rel = Release.parse(release)
            text = str(rel)
            if text in self.runtime.pipelines:
                self.steps.put(lambda: self._finish(ticket))
                return {"ok": f"{self.state.worker} already warm on {text}"}
            if text in self.busy:
                raise Refused(f"{self.state.worker} is already warming {text}")
            self._target(rel)
            self._evictions(rel, self._adapter_bytes(rel, from_archive=True))
        except (Refused, InvalidName) as exc:
            return {"refused": str(exc)}
        self.busy.add(text)
        threading.Thread(target=self._sync_then_load, args=(rel, ticket), name="warmfleet-live-sync",
                         daemon=True).start()
        return {"ok": f"{self.state.worker} warming {text}"}

    def request_retire(self, release: str, ticket: str) -> dict[str, str]:
        try:
            text = str(Release.parse(release))
            resident = self.runtime.pipelines.get(text)
            if resident is None:
                raise Refused(f"{self.state.worker} does not serve {text}")
            if len(resident.releases) < 2 or not resident.adapters.get(text):
                raise Refused(f"{text} is the last release of its pipeline on {self.state.worker}: stop the worker "
                              "instead of retiring it")
        except (Refused, InvalidName) as exc:
            return {"refused": str(exc)}
        self.steps.put(lambda: self._retire_step(text, ticket))
        return {"ok": f"{self.state.worker} retiring {text}"}

    # -- the sync thread
    def _sync_then_load(self, rel: Release, ticket: str) -> None:
        try:
            sync_release(self.archive, self.store, rel, events=self.events)
        except Exception as exc:
            error = f"cannot sync {rel} into L2: {_one_line(exc)}"
            self.steps.put(lambda: self._finish(ticket, error, str(rel)))
            return
        self.steps.put(lambda: self._load_step(rel, ticket))

    # -- steps (the event loop only)
    def drain(self) -> None:
        """Run every queued step now: called from the event loop's timer, so never while a job runs."""
        while True:
            try:
                step = self.steps.get_nowait()
            except queue.Empty:
                return
            try:
                step()
            except Exception:  # a step records its own failure; the loop must go on serving regardless
                log.exception("live adapter step failed")

    def _load_step(self, rel: Release, ticket: str) -> None:
        text = str(rel)
        try:
            resident = self._target(rel)
            for victim in self._evictions(rel, self._adapter_bytes(rel)):
                self._unload(victim)
                self._emit("L1_EVICT", release=victim, reason=f"adapter budget, for {text}")
            lora = [ref for ref in rel.refs() if ref.component == "lora"]
            if len(lora) != 1:
                raise Refused(f"{text} has {len(lora)} LoRA components; a live warm loads exactly one")
            started = time.perf_counter()
            resident.add_adapter(text, adapter_name(lora[0].version),
                                 lambda pipe: load_adapter(pipe, self.store, lora[0]))
            seconds = time.perf_counter() - started
        except Exception as exc:
            self._finish(ticket, f"cannot load {text}: {_one_line(exc)}", text)
            return
        self.runtime.pipelines = {**self.runtime.pipelines, text: resident}
        self._consume(queue_for(rel), True)
        self.state.releases = [*self.state.releases, text]
        self._emit("L1_LIVE_LOAD", release=text, adapter=adapter_name(lora[0].version), seconds=round(seconds, 4))
        self._record(text, True)
        self._finish(ticket, release=text)

    def _record(self, text: str, held: bool) -> None:
        """Keep the live warms record (fleetstate/live.py) in step, so a restart warms what this worker held."""
        try:
            (LiveWarms(self.registry.redis).add if held else LiveWarms(self.registry.redis).remove)(text,
                                                                                                   self.state.worker)
        except Exception as exc:  # the adapter is loaded (or gone) all the same; only the record missed it
            log.warning("could not record the live warm of %s: %s", text, exc)

    def rewarm_recorded(self) -> list[str]:
        """At boot: warm again every release warmed live before (on any worker) whose base this worker serves and
        which it does not serve yet, as `warmfleet warm` would (sync, load between two jobs, consume, announce).
        Returns the releases asked for; each one's outcome shows in the registry like a live warm's."""
        asked = []
        for text in sorted(LiveWarms(self.registry.redis).all()):
            try:
                rel = Release.parse(text)
            except InvalidName:
                continue
            if text in self.runtime.pipelines or not any(
                    shared_base_key(Release.parse(served)) == shared_base_key(rel) for served in self.runtime.pipelines):
                continue
            answer = self.request_warm(text, f"boot-{text}")
            if "ok" in answer:
                asked.append(text)
                self._emit("L1_REWARM", release=text)
            else:
                log.warning("not warming %s again at boot: %s", text, answer.get("refused"))
        return asked

    def _retire_step(self, text: str, ticket: str) -> None:
        if text not in self.runtime.pipelines:
            self._finish(ticket, f"{self.state.worker} does not serve {text}")
            return
        self._unload(text)
        self._emit("L1_RETIRE", release=text)
        self._finish(ticket)

    def _unload(self, text: str) -> None:
        """Stop consuming the release's queue, forget it, delete its adapters (their memory is freed)."""
        self._consume(queue_for(text), False)
        pipelines = dict(self.runtime.pipelines)
        resident = pipelines.pop(text)
        self.runtime.pipelines = pipelines
        resident.remove_release(text)
        self.state.releases = [r for r in self.state.releases if r != text]
        self.registry.withdraw_release(self.state, text)
        self._record(text, False)

    def _finish(self, ticket: str, error: str = "", release: str | None = None) -> None:
        if release:
            self.busy.discard(release)
        self.state.warm_error = error
        self.state.warm_ticket = ticket
        self.state.lora_params, self.state.lora_bytes = self.footprint()
        if error:
            log.error("%s", error)
            self._emit("L1_LIVE_LOAD", release=release or "?", outcome="FAILED", reason=error)
        self.registry.publish(self.state)

    def _consume(self, queue_name: str, start: bool) -> None:
        if self.consumer is None:
            return
        if start:
            self.consumer.app.amqp.queues[queue_name]  # created as `--queues` would: exchange and key = its name
            self.consumer.add_task_queue(queue_name)
        else:
            self.consumer.cancel_task_queue(queue_name)

    # -- reading
    def footprint(self) -> tuple[int, int]:
        totals = [r.lora_footprint() for r in {id(r): r for r in self.runtime.pipelines.values()}.values()]
        return sum(p for p, _ in totals), sum(b for _, b in totals)

    def _target(self, rel: Release) -> ResidentPipeline:
        for served, resident in self.runtime.pipelines.items():
            if shared_base_key(Release.parse(served)) == shared_base_key(rel):
                return resident
        bases = sorted({_base_text(Release.parse(r)) for r in self.runtime.pipelines})
        raise Refused(f"{self.state.worker} serves {', '.join(bases)}, not {_base_text(rel)}: warm {rel} on a worker "
                      "of that base, or start one (`warmfleet worker --release …`)")

    def _adapter_bytes(self, rel: Release, from_archive: bool = False) -> int:
        read = self.archive.read_manifest if from_archive else self.store.manifest
        return sum(read(ref).total_size for ref in rel.refs() if ref.component == "lora")

    def _held(self) -> dict[str, int]:
        """Resident adapter name → bytes, across this worker's pipelines."""
        held: dict[str, int] = {}
        for served in self.runtime.pipelines:
            for ref in Release.parse(served).refs():
                if ref.component == "lora":
                    held[adapter_name(ref.version)] = self.store.manifest(ref).total_size
        return held

    def _evictions(self, rel: Release, new_bytes: int) -> list[str]:
        """Releases to retire, least recently used first, so one more adapter fits the budget; Refused if it can't."""
        if not self.max_adapters and not self.max_adapter_bytes:
            return []
        held = self._held()
        new_names = {adapter_name(ref.version) for ref in rel.refs() if ref.component == "lora"} - set(held)

        def fits(names: dict[str, int]) -> bool:
            count = len(names) + len(new_names)
            nbytes = sum(names.values()) + (new_bytes if new_names else 0)
            return (not self.max_adapters or count <= self.max_adapters) and \
                (not self.max_adapter_bytes or nbytes <= self.max_adapter_bytes)

        if fits(held):
            return []
        victims: list[str] = []
        for served in self._by_last_use():
            if fits(held):
                break
            if reasons_to_keep(self.registry.redis, served):
                continue
            victims.append(served)
            still = {adapter_name(ref.version) for r in self.runtime.pipelines if r not in victims
                     for ref in Release.parse(r).refs() if ref.component == "lora"}
            held = {name: size for name, size in held.items() if name in still}
        if not fits(held):
            raise Refused(f"{self.state.worker} holds its most adapters (budget {self._budget_text()}) and none can "
                          f"go (each is routed, pinned or has jobs waiting): retire one or raise "
                          "FLEET_MAX_RESIDENT_ADAPTERS")
        return victims

    def _by_last_use(self) -> list[str]:
        """Releases that could be evicted (a pipeline keeps one at least), least recently used first."""
        candidates = []
        for served, resident in self.runtime.pipelines.items():
            if resident.adapters.get(served) and len(resident.releases) > 1:
                candidates.append((resident.last_used.get(served, 0.0), served))
        return [served for _, served in sorted(candidates)]

    def _budget_text(self) -> str:
        parts = [f"{self.max_adapters} adapters"] if self.max_adapters else []
        parts += [f"{self.max_adapter_bytes} bytes"] if self.max_adapter_bytes else []
        return ", ".join(parts)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.events:
            self.events.emit(kind, worker=self.state.worker, **fields)


def _one_line(exc: BaseException) -> str:
    """An exception as one line: diffusers' load errors list every mismatched tensor on a line of its own."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return f"{type(exc).__name__}: {text}"


def _base_text(rel: Release) -> str:
    return "+".join(f"{c}-{v}" for c, v in rel.components if c != "lora") + f" of {rel.model}"


class LiveAdapterStep(bootsteps.StartStopStep):
    """Runs the queued live-adapter steps from the consumer's timer: in the event loop, so between jobs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.tref = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        live = getattr(c.app, "fleet_live", None)
        if live is not None:
            live.consumer = c
            self.tref = c.timer.call_repeatedly(DRAIN_SECONDS, live.drain)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def attach_live(app: Any, live: LiveAdapters) -> None:
    """Give the worker's app its live-adapter manager and the step that drains it (before worker_main)."""
    app.fleet_live = live
    if LiveAdapterStep not in app.steps["consumer"]:
        app.steps["consumer"].add(LiveAdapterStep)


def _live(state: Any) -> LiveAdapters | None:
    return getattr(state.consumer.app, "fleet_live", None)


@control_command(name=WARM_COMMAND, args=[("release", str), ("ticket", str)], signature="<release> <ticket>")
def fleet_warm(state: Any, release: str, ticket: str = "", **_: Any) -> dict[str, str]:
    """Load RELEASE's LoRA beside the resident adapters between two jobs, then consume its queue."""
    live = _live(state)
    return live.request_warm(release, ticket) if live else {"refused": "this worker holds no resident pipeline"}


@control_command(name=RETIRE_COMMAND, args=[("release", str), ("ticket", str)], signature="<release> <ticket>")
def fleet_retire(state: Any, release: str, ticket: str = "", **_: Any) -> dict[str, str]:
    """Stop consuming RELEASE's queue and delete its adapter between two jobs."""
    live = _live(state)
    return live.request_retire(release, ticket) if live else {"refused": "this worker holds no resident pipeline"}

