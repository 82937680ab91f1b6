"""The boot-time check of what the fleet relies on in kombu and Celery beyond their public API (docs/internals.md).

`check(app)` runs when the app is configured (tasks/app.py) and at worker boot. Where an internal it relies on is
not as expected — a method renamed or with another signature, a key layout changed, a setting that would move
kombu's or Celery's keys away from where the fleet's scripts look — it raises `UpstreamMismatch`, whose message is
one line naming the library, its installed version and what changed, instead of a worker that loses jobs quietly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


class UpstreamMismatch(RuntimeError):
    """An internal of kombu or Celery is not as the fleet expects: one line, library and version first."""


def _version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return "?"


def _fail(library: str, what: str) -> UpstreamMismatch:
    return UpstreamMismatch(f"{library} {_version(library)}: {what} (see docs/internals.md, Dispatch)")


def _parameters(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


POSITIONAL, VAR_POSITIONAL, VAR_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL,
                                           inspect.Parameter.VAR_KEYWORD)


def check_put(channel: type) -> None:
    """The outbox's override (tasks/transport.py) runs kombu's `_put(queue, message, **kwargs)` with a stand-in for
    its publish batch (`_publish_batch=`), to which kombu adds its LPUSH: the hook must still look so."""
    put = getattr(channel, "_put", None)
    if not callable(put):
        raise _fail("kombu", f"{channel.__module__}.{channel.__qualname__} has no _put (the outbox's send hook)")
    expected = [("self", POSITIONAL), ("queue", POSITIONAL), ("message", POSITIONAL), ("kwargs", VAR_KEYWORD)]
    if _parameters(put) != expected:
        raise _fail("kombu", f"{channel.__qualname__}._put{inspect.signature(put)} is not "
                             "(self, queue, message, **kwargs), which the outbox's send overrides")
    code = getattr(put, "__code__", None)
    if code is None or "_publish_batch" not in code.co_consts or "add" not in code.co_names \
            or "lpush" not in code.co_consts:
        raise _fail("kombu", f"{channel.__qualname__}._put no longer adds its LPUSH to a `_publish_batch` "
                             "(the outbox's send reads kombu's commands from it)")


def check_batch(batch: type) -> None:
    add = getattr(batch, "add", None)
    if not callable(add) or _parameters(add) != [("self", POSITIONAL), ("name", POSITIONAL), ("args", VAR_POSITIONAL)]:
        raise _fail("kombu", f"{batch.__qualname__}.add is not (self, name, *args), the publish batch the outbox's "
                             "send stands in for")


def check_layout(channel: type) -> None:
    """kombu's Redis key layout as the fleet's scripts address it (fleetstate/keys.py reads it from the channel)."""
    from fleetstate import keys

    sep, steps = getattr(channel, "sep", None), getattr(channel, "priority_steps", None)
    unacked, index = getattr(channel, "unacked_key", None), getattr(channel, "unacked_index_key", None)
    if not (isinstance(sep, str) and sep):
        raise _fail("kombu", f"{channel.__qualname__}.sep is {sep!r}, not the separator of a queue's priority lists")
    if not (isinstance(steps, (list, tuple)) and steps and all(isinstance(s, int) for s in steps)
            and list(steps) == sorted(set(steps)) and steps[0] == 0):
        raise _fail("kombu", f"{channel.__qualname__}.priority_steps is {steps!r}, not ascending steps from 0")
    for name, value in (("unacked_key", unacked), ("unacked_index_key", index)):
        if not (isinstance(value, str) and value):
            raise _fail("kombu", f"{channel.__qualname__}.{name} is {value!r}, not the name of a Redis key")
    if getattr(channel, "global_keyprefix", "") != "":
        raise _fail("kombu", f"{channel.__qualname__}.global_keyprefix is set: kombu's keys are prefixed, the "
                             "fleet's scripts address them unprefixed")
    seen = (keys.PRIORITY_SEP, keys.QUEUE_PRIORITY_STEPS, keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX)
    if seen != (sep, tuple(steps), unacked, index):
        raise _fail("kombu", f"{channel.__qualname__}'s key layout {(sep, steps, unacked, index)!r} is not the one "
                             f"fleetstate/keys.py read {seen!r}")


def check_switch(transport: str, strategy: Callable[[list[str]], Any]) -> None:
    """A `;`-separated broker URL is failover alternates to kombu; a switch to the next one, handed a host by the
    fleet's failover strategy (tasks/sentinel.py), must keep the configured transport. Nothing is connected."""
    from kombu import Connection

    conn = Connection("sentinel://sentinel-a:26379;sentinel://sentinel-b:26379/0", transport=transport,
                      failover_strategy=strategy)
    conn.maybe_switch_next()
    if conn.transport_cls != transport or conn.hostname != "sentinel-b":
        raise _fail("kombu", f"Connection.switch to the next failover host gave transport {conn.transport_cls!r}, "
                             f"host {conn.hostname!r}: a failover would leave the fleet's transport ({transport})")


def check_celery_backend() -> None:
    """The Sentinel backend's connection class is set in `connparams`, which celery hands to redis-py's Sentinel;
    Celery's result keys are `task_keyprefix` + id (fleetstate/keys.py)."""
    from celery.backends.base import KeyValueStoreBackend
    from celery.backends.redis import RedisBackend, SentinelBackend

    if "connparams" not in RedisBackend.__init__.__code__.co_names \
            or "_get_sentinel_instance" not in SentinelBackend.__dict__:
        raise _fail("celery", "the Redis Sentinel result backend no longer builds its Sentinel from `connparams` "
                              "(where the fleet sets its failover-aware connection class)")
    if not isinstance(KeyValueStoreBackend.task_keyprefix, str):
        raise _fail("celery", f"KeyValueStoreBackend.task_keyprefix is {KeyValueStoreBackend.task_keyprefix!r}")


@functools.cache
def check_libraries() -> None:
    """What the installed kombu and celery must be like (once per process)."""
    from kombu.transport.redis import Channel, PublishBatch

    from . import sentinel
    from .transport import FleetRedisChannel

    check_put(Channel)
    check_batch(PublishBatch)
    check_layout(Channel)
    check_layout(FleetRedisChannel)
    check_layout(sentinel.FleetSentinelChannel)
    check_switch(sentinel.TRANSPORT, sentinel.failover_hosts)
    check_celery_backend()


def check_settings(conf: Any) -> None:
    """No transport option of the app moves kombu's or Celery's keys away from where the fleet's scripts look."""
    from fleetstate.keys import CELERY_LAYOUT_OPTIONS, KOMBU_LAYOUT_OPTIONS

    broker = [k for k in KOMBU_LAYOUT_OPTIONS if k in (conf.broker_transport_options or {})]
    if broker:
        raise _fail("kombu", f"broker_transport_options sets {', '.join(broker)}: the fleet's scripts address "
                             "kombu's default Redis key layout")
    result = [k for k in CELERY_LAYOUT_OPTIONS if k in (conf.result_backend_transport_options or {})]
    if result:
        raise _fail("celery", f"result_backend_transport_options sets {', '.join(result)}: the outbox reads "
                              "Celery's result keys unprefixed")


def check(app: Any = None) -> None:
    """Raise UpstreamMismatch (one line: library, version, what) if kombu or Celery is not as the fleet relies on;
    with `app`, its settings too. Cheap: the library checks run once per process."""
    check_libraries()
    if app is not None:
        check_settings(app.conf)
