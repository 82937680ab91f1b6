"""Retention plans on the in-memory archive: what is kept, why, and what is never deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemgr.archive import MemoryArchive
from cachemgr.names import ComponentRef
from cachemgr.retention import execute, plan_retention


@pytest.fixture
def archive(tmp_path: Path) -> MemoryArchive:
    source = tmp_path / "v"
    source.mkdir()
    (source / "config.json").write_text("{}")
    archive = MemoryArchive()
    for i in range(1, 9):
        archive.publish(ComponentRef("nano", "lora", f"v{i}.0"), source)
    for i in range(1, 3):
        archive.publish(ComponentRef("nano", "base", f"v{i}.0"), source)
    return archive


def lora(version: str) -> ComponentRef:
    return ComponentRef("nano", "lora", version)


def test_the_newest_n_are_kept_and_the_rest_planned_for_deletion(archive):
    plan = plan_retention(archive, keep=5)

    assert [r.version for r in plan.to_delete] == ["v1.0", "v2.0", "v3.0"]
    assert plan.kept[lora("v8.0")] == "latest 5"
    assert plan.kept[ComponentRef("nano", "base", "v1.0")] == "latest 5"


def test_planning_deletes_nothing(archive):
    plan_retention(archive, keep=1)
    assert len(archive.list_versions("nano", "lora")) == 8


def test_protected_versions_are_kept_with_their_reason(archive):
    protected = {lora("v1.0"): "routed", lora("v2.0"): "warm", lora("v8.0"): "pinned"}

    plan = plan_retention(archive, keep=2, protected=protected)

    assert plan.kept[lora("v1.0")] == "protected: routed"
    assert plan.kept[lora("v2.0")] == "protected: warm"
    assert plan.kept[lora("v8.0")] == "latest 2; protected: pinned"
    assert lora("v1.0") not in plan.to_delete
    assert "keep   nano/lora/v1.0  (protected: routed)" in plan.describe()


def test_a_plain_set_protects_too(archive):
    plan = plan_retention(archive, keep=1, protected={lora("v3.0")})
    assert plan.kept[lora("v3.0")] == "protected"


def test_execute_deletes_exactly_the_plan(archive):
    plan = plan_retention(archive, keep=3, protected={lora("v2.0")})

    deleted = execute(plan, archive)

    assert [r.version for r in deleted] == ["v1.0", "v3.0", "v4.0", "v5.0"]
    assert archive.list_versions("nano", "lora") == ["v2.0", "v6.0", "v7.0", "v8.0"]
    assert archive.list_versions("nano", "base") == ["v1.0", "v2.0"]


def test_execute_skips_a_version_protected_after_planning(archive):
    """A route may move to an old version between plan and execute: protection is checked again."""
    plan = plan_retention(archive, keep=7)
    assert plan.to_delete == (lora("v1.0"),)

    assert execute(plan, archive, protected={lora("v1.0"): "routed"}) == []
    assert "v1.0" in archive.list_versions("nano", "lora")


def test_a_version_already_deleted_elsewhere_is_not_an_error(archive):
    plan = plan_retention(archive, keep=7)
    archive.delete_version(lora("v1.0"))
    assert execute(plan, archive) == []


def test_keep_must_leave_at_least_the_newest(archive):
    with pytest.raises(ValueError, match="at least 1"):
        plan_retention(archive, keep=0)
