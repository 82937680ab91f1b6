"""A per-process cache of routes that Redis pub/sub invalidates, with a TTL as backstop for lost messages.

A producer sends many jobs per second; reading the route from Redis on every send costs a round trip. The cache
serves a route from memory only while its subscriber is connected: while it is not (starting, reconnecting), a
message may be missed, so every read goes to Redis. Fork-safe: a child process (a prefork pool, a gunicorn worker)
inherits the cache but not the subscriber thread, so the first use in a new process starts afresh.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import redis

from .client import redis_client

V = TypeVar("V")


class _ProcessState(Generic[V]):
    """Everything that must not cross a fork: the lock, the entries, the client and the subscriber thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.entries: dict[str, tuple[float, V]] = {}
        self.generation = 0  # bumped by every invalidation; a read started before one is not cached
        self.listening = False
        self.subscriptions = 0  # how many times the subscriber has (re)subscribed
        self.client: redis.Redis | None = None
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()


class RouteCache(Generic[V]):
    def __init__(self, redis_url: str | None, loader: Callable[[redis.Redis, str], V], ttl: float,
                 channel: str, master_name: str | None = None) -> None:
        self.redis_url = redis_url
        self.master_name = master_name
        self.loader = loader
        self.ttl = ttl
        self.channel = channel
        self._state: _ProcessState[V] = _ProcessState()
        self._fork_lock = threading.Lock()

    def _current(self) -> _ProcessState[V]:
        """This process's state; a forked child drops what it inherited (a held lock, a thread that is not there)."""
        state = self._state
        if state.pid != os.getpid():
            with self._fork_lock:
                if self._state.pid != os.getpid():
                    self._state = _ProcessState()
                state = self._state
        return state

    def client(self) -> redis.Redis:
        state = self._current()
        with state.lock:
            if state.client is None:
                if self.redis_url is None:
                    raise RuntimeError("no Redis URL configured for the route cache")
                state.client = redis_client(self.redis_url, self.master_name)
            return state.client

    def get(self, model: str) -> V:
        state = self._current()
        if self.ttl <= 0:
            return self.loader(self.client(), model)
        self._ensure_subscriber(state)
        now = time.monotonic()
        with state.lock:
            hit = state.entries.get(model)
            if state.listening and hit is not None and now - hit[0] < self.ttl:
                return hit[1]
            generation = state.generation
        value = self.loader(self.client(), model)
        with state.lock:
            if state.listening and state.generation == generation:
                state.entries[model] = (now, value)
        return value

    def invalidate(self, model: str | None = None) -> None:
        self._invalidate(self._current(), model)

    @staticmethod
    def _invalidate(state: _ProcessState[V], model: str | None) -> None:
        with state.lock:
            if model is None:
                state.entries.clear()
            else:
                state.entries.pop(model, None)
            state.generation += 1
            state.changed.notify_all()

    @property
    def generation(self) -> int:
        """How many invalidations this process has seen; `wait_generation` waits for the next ones."""
        return self._current().generation

    @property
    def listening(self) -> bool:
        return self._current().listening

    def wait_generation(self, above: int, timeout: float) -> bool:
        """Wait until an invalidation after `above` has been applied (a route change has reached this process)."""
        state = self._current()
        with state.lock:
            return state.changed.wait_for(lambda: state.generation > above, timeout)

    @property
    def subscriptions(self) -> int:
        return self._current().subscriptions

    def wait_listening(self, timeout: float, after: int = 0) -> bool:
        """Wait until the subscriber is subscribed (for the `after`+1-th time or later: a re-subscription)."""
        state = self._current()
        self._ensure_subscriber(state)
        with state.lock:
            return state.changed.wait_for(lambda: state.listening and state.subscriptions > after, timeout)

    def close(self) -> None:
        """Stop this process's subscriber (tests, benchmarks); the next `get` starts a new one."""
        with self._fork_lock:
            state, self._state = self._current(), _ProcessState()
        state.stop.set()
        if state.thread is not None:
            state.thread.join(timeout=5)

    def _ensure_subscriber(self, state: _ProcessState[V]) -> None:
        if state.thread is not None and state.thread.is_alive():
            return
        with state.lock:
            if state.thread is not None and state.thread.is_alive():
                return
            state.thread = threading.Thread(target=_listen, args=(weakref.ref(self), state, self.redis_url, self.channel,
                                                                    self.master_name),
                                            name="warmfleet-route-subscriber", daemon=True)
            state.thread.start()



def _set_listening(state: _ProcessState[V], listening: bool) -> None:
    with state.lock:
        state.listening = listening
        state.subscriptions += 1 if listening else 0
        state.entries.clear()  # whatever happened while not listening is unknown
        state.generation += 1
        state.changed.notify_all()


def _listen(owner: weakref.ref, state: _ProcessState[V], redis_url: str, channel: str,
            master_name: str | None = None) -> None:
    """The subscriber thread. It holds its cache only weakly and ends once the cache is gone (a re-configured
    app drops its old router) or closed."""
    backoff = 0.05
    while not state.stop.is_set() and owner() is not None:
        pubsub = client = None
        try:
            client = redis_client(redis_url, master_name, health_check_interval=10)
            pubsub = client.pubsub()
            pubsub.subscribe(channel)
            while not state.stop.is_set() and owner() is not None:
                message = pubsub.get_message(timeout=0.5)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    _set_listening(state, True)
                    backoff = 0.05
                elif message["type"] == "message":
                    RouteCache._invalidate(state, message["data"].decode())
        except (redis.RedisError, OSError, ValueError):
            pass  # the broker is down or restarting: read through Redis until subscribed again
        finally:
            if state.listening:
                _set_listening(state, False)
            for closable in (pubsub, client):
                try:
                    if closable is not None:
                        closable.close()
                except (redis.RedisError, OSError):
                    pass
        state.stop.wait(backoff)
        backoff = min(backoff * 2, 2.0)
