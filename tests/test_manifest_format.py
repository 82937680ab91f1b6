"""A version published by the archive code before layout detection and variant subsets (commit 50fb4f5, manifest
format 1 without layout meta) still syncs, verifies and serves with today's code. The fixture is those bytes,
committed as that code wrote them (tests/fixtures/manifest_format_1/make.py says how)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cachemgr import Cache, LocalArchive
from cachemgr.names import ComponentRef, Release
from cachemgr.repair import verify_ref
from cachemgr.sync import sync_release
from cachemgr.variants import files_for
from tasks.requests import GenerateRequest
from workers.models import builder_for, family_of

FIXTURE = Path(__file__).parent / "fixtures" / "manifest_format_1" / "archive"
REF = ComponentRef("old", "base", "v1")


@pytest.fixture
def archive(tmp_path: Path) -> LocalArchive:
    return LocalArchive(shutil.copytree(FIXTURE, tmp_path / "archive"))


def test_the_fixture_is_the_old_format(archive):
    raw = json.loads((archive.root / "old" / "base" / "v1" / "manifest.json").read_text())
    assert raw["format"] == 1 and "layout" not in raw["meta"] and "layout_version" not in raw["meta"]
    assert raw["meta"]["family"] == "sd"


def test_an_old_manifest_syncs_verifies_and_serves(archive, tmp_path, one_torch_thread):
    cache = Cache.at(tmp_path / "l2")
    release = Release.parse("old@base-v1")
    report = sync_release(archive, cache.store, release, select=files_for("float32")).reports[0]
    assert report.outcome == "UPDATED" and report.bytes_fetched == archive.read_manifest(REF).total_size
    assert all(c.ok for c in cache.store.check(REF)) and verify_ref(archive, cache.store, REF) == []
    assert cache.store.has(REF, files_for("float16"))  # no variants: every node takes every file
    resident = builder_for(family_of(cache.store, release)).builder("old", release).with_cache(cache).on("cpu").build()
    png, params, _ = resident.generate(GenerateRequest(prompt="a leather jacket", seed=3))
    assert png[:4] == b"\x89PNG" and params["width"] == 32 and params["steps"] == 2
    again, _, _ = resident.generate(GenerateRequest(prompt="a leather jacket", seed=3))
    assert again == png
