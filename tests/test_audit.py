"""The audit plans before it acts: retention keeps the newest N and everything protected."""

from __future__ import annotations

import os
import time

from cachemgr import Cache, EventLog, MemoryArchive
from cachemgr.audit import execute_audit, plan_audit
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_ref


def publish_versions(tmp_path, archive, n):
    refs = []
    for i in range(1, n + 1):
        src = tmp_path / f"v{i}"
        src.mkdir()
        (src / "config.json").write_text(f'{{"v": {i}}}')
        (src / "shared.txt").write_text("the same in every version")
        ref = ComponentRef("m", "lora", f"v{i}.0.0")
        archive.publish(ref, src)
        refs.append(ref)
    return refs


def test_retention_keeps_the_newest_and_the_protected_and_says_why(tmp_path):
    archive = MemoryArchive()
    refs = publish_versions(tmp_path, archive, 8)
    store = Cache.at(tmp_path / "l2").store
    for ref in refs:
        sync_ref(archive, store, ref)
    plan = plan_audit(store, keep=3, protected={refs[0]: "routed (previous)", refs[2]: "pinned"})
    assert set(plan.retire) == {refs[1], refs[3], refs[4]}
    kept = dict(plan.keep)
    assert kept[refs[0]] == "routed (previous)" and kept[refs[2]] == "pinned" and kept[refs[7]] == "latest 3"
    assert "retire m/lora/v2.0.0" in plan.describe()
    assert len(plan.orphan_blobs) == 3  # the retired versions' own config blobs; the shared one stays

    events = EventLog(tmp_path / "events.jsonl")
    result = execute_audit(store, plan, events)
    assert sorted(result.retired) == sorted(map(str, plan.retire))
    assert store.refs() == [refs[0], refs[2], refs[5], refs[6], refs[7]]
    assert result.collected_blobs == 3
    for ref in store.refs():
        assert all(c.ok for c in store.check(ref))
    assert [e["event"] for e in events.read()].count("L2_RETIRE") == 3


def test_dry_run_changes_nothing(tmp_path):
    archive = MemoryArchive()
    refs = publish_versions(tmp_path, archive, 4)
    store = Cache.at(tmp_path / "l2").store
    for ref in refs:
        sync_ref(archive, store, ref)
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    plan = plan_audit(store, keep=1)
    assert len(plan.retire) == 3
    after = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    assert before == after


def test_only_old_temp_files_are_removed(tmp_path):
    store = Cache.at(tmp_path / "l2").store
    store.tmp.mkdir(parents=True)
    old = store.tmp / "a.partial"
    fresh = store.tmp / "b.incomplete"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    plan = plan_audit(store)
    assert plan.stale_temp_files == ("a.partial",)
    execute_audit(store, plan)
    assert not old.exists() and fresh.exists()
