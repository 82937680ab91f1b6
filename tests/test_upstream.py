"""What the fleet relies on in kombu and Celery beyond their public API (docs/internals.md, "Dispatch"), and its guards:

- the boot check (tasks/upstream.py) passes on the installed libraries and fails in one line naming the library and
  its version when an internal is not as expected (stand-ins lacking it);
- the outbox's send (tasks/transport.py, an override of kombu's `Channel._put`) queues exactly what kombu's plain
  channel queues — same list, same bytes, same expiry — and records `generate` sends in the outbox;
- the rest is public API: the Lua scripts load from fleetstate/lua/, kombu's key layout is read from its channel,
  the app re-points in place, and a Sentinel broker keeps the fleet's transport through kombu's failover switch.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport.redis import Channel, PublishBatch
from redis._parsers.base import _RESPBase

from fleetstate import keys, outbox
from fleetstate.client import FailoverAwareConnection, refused_without_replica
from fleetstate.scripts import TOKEN_LOCK, Lua, extend_token, release_token
from tasks import sentinel, upstream
from tasks.app import FleetCelery, configure
from tasks.router import GENERATE_TASK
from tasks.transport import TRANSPORT

from .support import fleet_settings_for

KOMBU = f"kombu {version('kombu')}: "
CELERY = f"celery {version('celery')}: "


def one_line(exc: pytest.ExceptionInfo, library: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.startswith(library), text
    return text


# -- the boot check ----------------------------------------------------------------------------------------------


def test_the_check_passes_on_the_installed_libraries_and_a_configured_app(tmp_path: Path):
    upstream.check()
    upstream.check(configure(fleet_settings_for(tmp_path, "redis://127.0.0.1:1/0"), FleetCelery("upstream-ok")))


class NoPut:
    sep, priority_steps, unacked_key, unacked_index_key, global_keyprefix = "\x06\x16", [0, 3, 6, 9], "u", "ui", ""


class PutWithAnotherSignature(NoPut):
    def _put(self, queue: str, message: dict, priority: int = 0) -> None:
        pass


class PutWithoutBatch(NoPut):
    def _put(self, queue: str, message: dict, **kwargs: Any) -> None:
        self.client.lpush(queue, json.dumps(message))  # type: ignore[attr-defined]


def test_a_channel_without_the_put_the_outbox_overrides_fails_in_one_line():
    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check_put(NoPut)
    assert "has no _put" in one_line(exc, KOMBU)
    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check_put(PutWithAnotherSignature)
    assert "(self, queue, message, **kwargs)" in one_line(exc, KOMBU)
    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check_put(PutWithoutBatch)
    assert "_publish_batch" in one_line(exc, KOMBU)
    upstream.check_put(Channel)


def test_a_publish_batch_of_another_shape_fails_in_one_line():
    class Batch:
        def add(self, command: tuple) -> None:
            pass

    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check_batch(Batch)
    assert "add is not (self, name, *args)" in one_line(exc, KOMBU)
    upstream.check_batch(PublishBatch)


@pytest.mark.parametrize("attribute, value, says", [
    ("sep", "", "sep is ''"),
    ("priority_steps", [9, 6, 3, 0], "not ascending steps from 0"),
    ("unacked_key", None, "unacked_key is None"),
    ("global_keyprefix", "tenant:", "global_keyprefix is set"),
    ("priority_steps", [0, 5], "is not the one fleetstate/keys.py read"),
])
def test_a_key_layout_other_than_the_one_the_scripts_address_fails_in_one_line(attribute: str, value: Any, says: str):
    changed = type("ChangedChannel", (NoPut,), {attribute: value,
                                                 "unacked_key": Channel.unacked_key if attribute != "unacked_key" else value,
                                                 "unacked_index_key": Channel.unacked_index_key})
    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check_layout(changed)
    assert says in one_line(exc, KOMBU)


def test_transport_options_that_would_move_kombus_or_celerys_keys_are_refused(tmp_path: Path):
    app = configure(fleet_settings_for(tmp_path, "redis://127.0.0.1:1/0"), FleetCelery("upstream-options"))
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "sep": ":"}
    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check(app)
    assert "broker_transport_options sets sep" in one_line(exc, KOMBU)
    app.conf.broker_transport_options = {}
    app.conf.result_backend_transport_options = {"global_keyprefix": "x:"}
    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check(app)
    assert "global_keyprefix" in one_line(exc, CELERY)


def test_a_failover_switch_that_resets_the_transport_fails_the_check():
    from kombu.connection import roundrobin_failover

    with pytest.raises(upstream.UpstreamMismatch) as exc:
        upstream.check_switch(sentinel.TRANSPORT, roundrobin_failover)  # kombu's own: the next URL's scheme wins
    assert "a failover would leave the fleet's transport" in one_line(exc, KOMBU)
    upstream.check_switch(sentinel.TRANSPORT, sentinel.failover_hosts)


# -- the outbox's send equals kombu's own ------------------------------------------------------------------------


@pytest.fixture
def dbs(redis_server):
    """Two databases of one server: the fleet's transport sends into one, kombu's plain one into the other."""
    base = redis_server.url.rsplit("/", 1)[0]
    clients = {db: redis.Redis.from_url(f"{base}/{db}") for db in (1, 2)}
    for client in clients.values():
        client.flushdb()
    yield base, clients[1], clients[2]
    for client in clients.values():
        client.flushdb()


SENDS = [  # (queue, task, priority, expires s)
    ("fleet.m@base-v1.0.0", GENERATE_TASK, None, None),
    ("fleet.m@base-v1.0.0", GENERATE_TASK, 5, None),
    ("fleet.m@base-v1.0.0", GENERATE_TASK, 9, None),
    ("fleet.maintenance", "warmfleet.sync", None, None),
    ("fleet.expiring", GENERATE_TASK, 4, 60),
    ("fleet.expiring-other", "warmfleet.sync", None, 60),
]


def send_all(url: str, transport: str | None, batched: bool) -> list[str]:
    """Publish SENDS through a kombu connection with `transport` (None: kombu's plain one); the delivery tags."""
    tags = []
    with Connection(url, transport=transport) as conn:
        channel = conn.default_channel
        batch = channel.create_publish_batch(100) if batched else None
        for i, (queue, task, priority, expires) in enumerate(SENDS):
            declared = Queue(queue, Exchange(queue, type="direct"), routing_key=queue,
                             expires=expires, max_priority=10)
            declared(channel).declare()
            message = channel.prepare_message(json.dumps({"i": i}), priority=priority,
                                              content_type="application/json", content_encoding="utf-8",
                                              headers={"task": task, "id": f"task-{i}"})
            if batch is not None:
                batch.publish(message, exchange=queue, routing_key=queue)
            else:
                channel.basic_publish(message, exchange=queue, routing_key=queue)
            tags.append(message["properties"]["delivery_tag"])
        if batch is not None:
            batch.flush()
            batch.close()
    return tags


def queued(client: redis.Redis, tags: list[str]) -> dict[str, list[bytes]]:
    """Every queue list with its messages, each delivery tag replaced by its send's index (tags are random)."""
    out = {}
    for queue in sorted({q for q, *_ in SENDS}):
        for name in keys.queue_lists(queue):
            items = client.lrange(name, 0, -1)
            for i, tag in enumerate(tags):
                items = [item.replace(tag.encode(), f"<tag {i}>".encode()) for item in items]
            if items:
                out[name] = items
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one-send", "kombu-publish-batch"])
def test_a_send_through_the_outbox_queues_what_kombus_plain_channel_queues(dbs, batched: bool):
    base, ours, plain = dbs
    our_tags = send_all(f"{base}/1", TRANSPORT, batched)
    plain_tags = send_all(f"{base}/2", None, batched)
    assert queued(ours, our_tags) == queued(plain, plain_tags)
    for name in queued(plain, plain_tags):
        assert (ours.pttl(name) > 0) == (plain.pttl(name) > 0), name  # an expiring queue's lists expire alike

    entries = {e.tag: e for e in outbox.pending(ours)}  # every generate send, recorded with what was queued
    generate = [i for i, (_, task, *_rest) in enumerate(SENDS) if task == GENERATE_TASK]
    assert sorted(entries) == sorted(our_tags[i] for i in generate)
    for i in generate:
        entry = entries[our_tags[i]]
        assert entry.task_id == f"task-{i}" and entry.message.encode() in ours.lrange(entry.list, 0, -1)
        assert entry.list == keys.priority_list(SENDS[i][0], SENDS[i][2] or 0)
    assert outbox.pending(plain) == []


# -- public API where there was a departure ----------------------------------------------------------------------


def test_every_script_loads_from_the_package_and_the_token_lock_serves_all_holders(redis_server):
    lua_dir = Path(keys.__file__).with_name("lua")
    assert sorted(p.stem for p in lua_dir.glob("*.lua")) == sorted(
        ["token_lock", "lease_claim", "lease_complete", "lease_leave", "outbox_enqueue", "outbox_resend",
         "orphan_restore", "queue_move", "fanout_mark"])
    client = redis_server.client()
    client.set("fleet:test:lock", "me", px=10_000)
    assert extend_token(client, "fleet:test:lock", "other", 60_000) == 0
    assert extend_token(client, "fleet:test:lock", "me", 60_000) == 1 and client.pttl("fleet:test:lock") > 10_000
    assert release_token(client, "fleet:test:lock", "other") == 0 and client.exists("fleet:test:lock")
    assert release_token(client, "fleet:test:lock", "me") == 1 and not client.exists("fleet:test:lock")
    assert extend_token(client, "fleet:test:lock", "me", 5_000) == 0  # gone: not taken back unless asked
    assert extend_token(client, "fleet:test:lock", "me", 5_000, take_back=True) == 2
    assert client.get("fleet:test:lock") == b"me"
    client.script_flush()  # a server that lost its scripts (a restart) is sent them again
    assert TOKEN_LOCK(client, ["fleet:test:lock"], ["me", "", ""]) == 1
    assert Lua("token_lock").text == TOKEN_LOCK.text


def test_kombus_key_layout_is_read_from_its_channel():
    assert (keys.KOMBU_UNACKED, keys.KOMBU_UNACKED_INDEX) == (Channel.unacked_key, Channel.unacked_index_key)
    assert keys.queue_lists("q") == ["q", *(f"q{Channel.sep}{s}" for s in Channel.priority_steps[1:])]


def test_a_re_pointed_app_uses_its_new_broker_and_result_urls(redis_server, tmp_path: Path):
    base = redis_server.url.rsplit("/", 1)[0]
    app = configure(fleet_settings_for(tmp_path, f"{base}/3"), FleetCelery("upstream-repoint"))
    assert app.backend.client.connection_pool.connection_kwargs["db"] == 3
    with app.pool.acquire(block=True) as conn:
        assert conn.virtual_host in ("3", "/3")
    configure(fleet_settings_for(tmp_path, f"{base}/4"), app)
    assert app.backend.client.connection_pool.connection_kwargs["db"] == 4
    with app.pool.acquire(block=True) as conn:
        assert conn.virtual_host in ("4", "/4")
    with app.producer_or_acquire() as producer:
        assert producer.connection.virtual_host in ("4", "/4")


def test_a_sentinel_broker_keeps_the_fleets_transport_and_connections(tmp_path: Path):
    url = "sentinel://127.0.0.1:1;sentinel://127.0.0.2:1/0"
    app = configure(fleet_settings_for(tmp_path, url), FleetCelery("upstream-sentinel"))
    conn = app.connection_for_write()
    assert conn.transport_cls == sentinel.TRANSPORT
    conn.maybe_switch_next()  # what kombu does on a connection error
    assert conn.transport_cls == sentinel.TRANSPORT and conn.hostname == "127.0.0.2"
    assert isinstance(app.backend, sentinel.FleetSentinelBackend)
    assert app.backend.client.connection_pool.connection_class is FailoverAwareConnection  # nothing is connected
    assert sentinel.FleetSentinelChannel.connection_class is FailoverAwareConnection


def test_a_refusal_without_replica_is_recognised_in_a_multi_too():
    parse = _RESPBase.parse_error
    assert refused_without_replica(parse("NOREPLICAS Not enough good replicas to write."))
    assert refused_without_replica(parse("EXECABORT Transaction discarded because of: NOREPLICAS Not enough good "
                                         "replicas to write."))
    assert not refused_without_replica(parse("EXECABORT Transaction discarded because of previous errors."))
    assert not refused_without_replica(parse("WRONGTYPE Operation against a key holding the wrong kind of value"))
