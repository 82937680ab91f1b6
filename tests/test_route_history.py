"""The route stack: promote pushes, rollback goes back to the newest earlier warm release and never forward, `--to`
goes to any archived release, `--force` only waives "no warm worker yet", and nothing the archive lacks is ever
routed. Real redis-server, the demo archive; workers are warm-registry records written as a worker writes them."""

from __future__ import annotations

import re

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachemgr import LocalArchive, Release
from fleetstate import rollout
from fleetstate.catalog import Catalog
from fleetstate.keys import ROUTE_HISTORY, ROUTE_KEY, ROUTE_STACK_KEY
from fleetstate.registry import WarmRegistry, WorkerState
from fleetstate.rollout import RouteRefused
from fleetstate.routes import RouteError, RouteTable, StackEntry

MODEL = "nano-banana"
ARCHIVED = [f"{MODEL}@base-{b}+lora-{lora}" for b in ("v1.0.0", "v1.1.0") for lora in ("v2.3.0", "v2.3.1")]
UNARCHIVED = [f"{MODEL}@base-v9.9.9+lora-v9.9.9", f"{MODEL}@base-v1.1.0+lora-v2.3.9"]
A, B, C, D = ARCHIVED


@pytest.fixture(scope="module")
def client(redis_server) -> redis.Redis:
    return redis_server.client()


@pytest.fixture(scope="module")
def archive(demo_archive_dir) -> LocalArchive:
    return LocalArchive(demo_archive_dir)


class Fleet:
    """Which releases have a warm worker: registry records as a worker publishes them (one per release)."""

    def __init__(self, client: redis.Redis) -> None:
        self.registry = WarmRegistry(client, ttl=600)
        self.states: dict[str, WorkerState] = {}

    def warm(self, *releases: str) -> None:
        for release in releases:
            state = WorkerState(worker=f"sim-{ARCHIVED.index(release)}@n", node="n", pid=1, state="warm",
                                releases=[release])
            self.states[release] = state
            self.registry.publish(state)

    def cold(self, *releases: str) -> None:
        for release in releases:
            state = self.states.pop(release, None)
            if state is not None:
                self.registry.withdraw(state)

    def reset(self) -> None:
        self.cold(*list(self.states))


@pytest.fixture
def fleet(client) -> Fleet:
    client.delete(ROUTE_KEY.format(model=MODEL), ROUTE_STACK_KEY.format(model=MODEL), ROUTE_HISTORY)
    fleet = Fleet(client)
    yield fleet
    fleet.reset()


def stack_of(client) -> list[str]:
    return [entry.release for entry in RouteTable(client).stack(MODEL)]


def test_a_second_rollback_goes_further_back_never_forward(client, archive, fleet):
    fleet.warm(A, B, C)
    for release in (A, B, C):
        rollout.promote(client, MODEL, release, actor="alice", archive=archive)
    assert stack_of(client) == [A, B, C]
    first = rollout.rollback(client, MODEL, actor="bob", archive=archive)
    assert (first.after.active, first.after.previous, first.abandoned) == (B, A, C)
    second = rollout.rollback(client, MODEL, actor="bob", archive=archive)
    assert (second.after.active, second.abandoned) == (A, B)  # further back, not forward to C
    with pytest.raises(RouteError, match="no earlier release"):
        rollout.rollback(client, MODEL, actor="bob", archive=archive)
    assert stack_of(client) == [A]
    entries = RouteTable(client).stack(MODEL)
    assert entries[0].actor == "alice" and entries[0].reason == "promote" and entries[0].at > 0


def test_rollback_passes_over_cold_releases_a_forced_promote_left_below(client, archive, fleet):
    fleet.warm(A, B)
    rollout.promote(client, MODEL, A, archive=archive)
    rollout.promote(client, MODEL, B, archive=archive)
    forced = rollout.promote(client, MODEL, C, force=True, archive=archive)  # cold: only forced
    assert forced.forced and "no worker is warm on" in forced.waiting and "0 job(s) already queued" in forced.waiting
    fleet.warm(D)
    rollout.promote(client, MODEL, D, archive=archive)  # stack A B C(cold) D
    change = rollout.rollback(client, MODEL, archive=archive)
    assert change.after.active == B  # the newest earlier release that is warm; C is passed over
    assert change.skipped == [f"{C} (no warm worker)"]
    assert stack_of(client) == [A, B]


def test_rollback_with_nothing_warm_below_is_refused_unless_forced(client, archive, fleet):
    fleet.warm(A, B)
    rollout.promote(client, MODEL, A, archive=archive)
    rollout.promote(client, MODEL, B, archive=archive)
    fleet.cold(A)
    with pytest.raises(RouteRefused, match=re.escape(f"no earlier release is warm and in the archive ({A} (no warm worker))")):
        rollout.rollback(client, MODEL, archive=archive)
    assert RouteTable(client).active(MODEL) == B
    forced = rollout.rollback(client, MODEL, force=True, archive=archive)
    assert forced.after.active == A and f"no worker is warm on {A}" in forced.waiting


def test_rollback_to_any_archived_release_cuts_the_stack_or_replaces_the_top(client, archive, fleet):
    fleet.warm(A, B, C, D)
    for release in (A, B, C):
        rollout.promote(client, MODEL, release, archive=archive)
    rollout.rollback(client, MODEL, to=A, archive=archive)
    assert stack_of(client) == [A]
    rollout.promote(client, MODEL, B, archive=archive)
    rollout.rollback(client, MODEL, to=D, archive=archive)  # never routed before: it replaces the abandoned top
    assert stack_of(client) == [A, D]
    assert RouteTable(client).get(MODEL).previous == A


@pytest.mark.parametrize("bad", UNARCHIVED)
def test_force_never_routes_what_the_archive_lacks(client, archive, fleet, bad):
    fleet.warm(A)
    rollout.promote(client, MODEL, A, archive=archive)
    for call in (lambda: rollout.promote(client, MODEL, bad, force=True, archive=archive),
                 lambda: rollout.promote(client, MODEL, bad, canary=10, force=True, archive=archive),
                 lambda: rollout.rollback(client, MODEL, to=bad, force=True, archive=archive)):
        with pytest.raises(RouteRefused, match=f"refusing to .* {re.escape(bad)}: the archive has no "):
            call()
    assert RouteTable(client).get(MODEL).active == A and stack_of(client) == [A]
    # the catalog learnt from the archive what it lacks: a producer pinning it is refused from then on
    assert Catalog(client).known(MODEL).missing(Release.parse(bad))


def test_a_route_written_before_stacks_reads_as_previous_then_active(client, archive, fleet):
    client.hset(ROUTE_KEY.format(model=MODEL), mapping={"active": B, "previous": A, "updated_at": "1"})
    assert stack_of(client) == [A, B]
    fleet.warm(A)
    assert rollout.rollback(client, MODEL, archive=archive).after.active == A


def test_stack_entries_round_trip_and_the_stack_is_bounded(client, fleet):
    table = RouteTable(client)
    for i in range(60):
        table.set_active(ARCHIVED[i % 2], actor=f"op{i}")
    stack = table.stack(MODEL)
    assert len(stack) == 50 and stack[-1].actor == "op59"
    assert StackEntry.from_json(stack[-1].to_json()) == stack[-1]


# -- the property: whatever operators do, the route names only archived releases and rollback never goes forward


OPS = st.one_of(
    st.tuples(st.just("promote"), st.sampled_from(ARCHIVED + UNARCHIVED), st.booleans()),
    st.tuples(st.just("canary"), st.sampled_from(ARCHIVED + UNARCHIVED), st.booleans()),
    st.tuples(st.just("rollback"), st.none(), st.booleans()),
    st.tuples(st.just("rollback-to"), st.sampled_from(ARCHIVED + UNARCHIVED), st.booleans()),
    st.tuples(st.just("warm"), st.sampled_from(ARCHIVED), st.booleans()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=14))
def test_any_sequence_routes_only_archived_releases_and_never_rolls_forward(client, archive, ops):
    client.delete(ROUTE_KEY.format(model=MODEL), ROUTE_STACK_KEY.format(model=MODEL))
    fleet = Fleet(client)
    try:
        for op, release, flag in ops:
            table = RouteTable(client)
            before, stack_before = table.get(MODEL), stack_of(client)
            try:
                if op == "warm":
                    (fleet.warm if flag else fleet.cold)(release)
                elif op == "promote":
                    rollout.promote(client, MODEL, release, force=flag, archive=archive)
                elif op == "canary":
                    rollout.promote(client, MODEL, release, canary=25, force=flag, archive=archive)
                elif op == "rollback":
                    rollout.rollback(client, MODEL, force=flag, archive=archive)
                else:
                    rollout.rollback(client, MODEL, to=release, force=flag, archive=archive)
            except (RouteRefused, RouteError):
                assert (table.get(MODEL), stack_of(client)) == (before, stack_before)  # a refusal changes nothing
                continue
            after, stack_after = table.get(MODEL), stack_of(client)
            named = {r for _, r in after.referenced()} | set(stack_after)
            assert named <= set(ARCHIVED), (op, release, flag, named)
            assert not stack_after or stack_after[-1] == after.active
            if op == "rollback" and not before.canary:
                # strictly back down the stack: the new stack is a proper prefix of the old one
                assert len(stack_after) < len(stack_before) and stack_after == stack_before[:len(stack_after)]
                warm = [r for r in reversed(stack_before[:-1]) if r != stack_before[-1] and fleet.registry.is_warm(r)]
                if warm:
                    assert after.active == warm[0]  # the newest earlier warm release
            elif op == "rollback-to":
                prefix = stack_after[:-1]
                assert prefix == stack_before[:len(prefix)] and len(stack_after) <= len(stack_before)
    finally:
        fleet.reset()
