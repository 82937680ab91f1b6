"""What the archive (L3) holds, kept in Redis: a route change, a producer and `status` ask it without listing L3.

Per model a set of `component/version`. It is written by whoever learns what the archive holds: a worker lists the
whole archive at boot (`refresh`), `warmfleet publish` adds what it published, `warmfleet prune` removes what it
deleted, `promote` / `rollback` / `warm` / `versions` correct it with what they read from the archive itself. Every
change is announced on a channel, so a producer reads it through the same pub/sub-invalidated cache as the routes
(`tasks/router.py`): a job pinned to a release costs no Redis round trip in the common case and never an archive
listing. Until the archive has been listed once (`fleet:catalog:listed`), the catalog knows only part of it and
refuses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from cachemgr.names import ComponentRef, Release, validate_name

from .keys import CATALOG_CHANNEL, CATALOG_KEY, CATALOG_LISTED, CATALOG_MODELS


@dataclass(frozen=True)
class Known:
    """One model's versions as the catalog knows them; `listed`: the whole archive was listed at least once, so a
    version not here is not in the archive."""

    model: str
    listed: bool
    versions: frozenset[str]  # "component/version"

    def missing(self, release: Release) -> list[ComponentRef]:
        """The release's components the archive does not hold ([] when the catalog cannot tell)."""
        if not self.listed:
            return []
        return [ref for ref in release.refs() if f"{ref.component}/{ref.version}" not in self.versions]


class Catalog:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def known(self, model: str) -> Known:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(CATALOG_LISTED)
            pipe.smembers(CATALOG_KEY.format(model=validate_name(model, "model")))
            listed, members = pipe.execute()
        return Known(model, bool(listed), frozenset(m.decode() for m in members))

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(CATALOG_MODELS))

    def listed_at(self) -> float | None:
        raw = self.redis.get(CATALOG_LISTED)
        return float(raw) if raw else None

    def record(self, refs: Iterable[ComponentRef]) -> None:
        """The archive holds these (just published, or just read there)."""
        self._apply(refs, add=True)

    def forget(self, refs: Iterable[ComponentRef]) -> None:
        """The archive no longer holds these (deleted by retention, or found missing there)."""
        self._apply(refs, add=False)

    def _apply(self, refs: Iterable[ComponentRef], add: bool) -> None:
        by_model: dict[str, list[str]] = {}
        for ref in refs:
            by_model.setdefault(ref.model, []).append(f"{ref.component}/{ref.version}")
        if not by_model:
            return
        with self.redis.pipeline() as pipe:
            for model, members in by_model.items():
                if add:
                    pipe.sadd(CATALOG_KEY.format(model=model), *members)
                    pipe.sadd(CATALOG_MODELS, model)
                else:
                    pipe.srem(CATALOG_KEY.format(model=model), *members)
                pipe.publish(CATALOG_CHANNEL, model)
            pipe.execute()

    def refresh(self, archive: Any) -> dict[str, set[str]]:
        """List the whole archive (a few LIST calls per model) and replace the catalog with what it holds."""
        found: dict[str, set[str]] = {}
        for model in archive.list_models():
            found[model] = {f"{component}/{version}" for component in archive.list_components(model)
                            for version in archive.list_versions(model, component)}
        before = set(self.models())
        with self.redis.pipeline() as pipe:
            for model in before - set(found):
                pipe.delete(CATALOG_KEY.format(model=model))
                pipe.srem(CATALOG_MODELS, model)
            for model, members in found.items():
                key = CATALOG_KEY.format(model=model)
                pipe.delete(key)
                if members:
                    pipe.sadd(key, *members)
                pipe.sadd(CATALOG_MODELS, model)
            pipe.set(CATALOG_LISTED, repr(time.time()))
            for model in before | set(found):
                pipe.publish(CATALOG_CHANNEL, model)
            pipe.execute()
        return found


def unarchived(client: redis.Redis, release: str | Release, archive: Any = None) -> list[ComponentRef]:
    """The components of `release` the archive does not hold. With `archive`, asked there (and the catalog corrected
    with the answer); without, read from the catalog (which refuses nothing before the archive was first listed)."""
    rel = release if isinstance(release, Release) else Release.parse(release)
    catalog = Catalog(client)
    if archive is None:
        return catalog.known(rel.model).missing(rel)
    missing = [ref for ref in rel.refs() if not archive.has_version(ref)]
    if missing and catalog.listed_at() is None:
        catalog.refresh(archive)  # a partial catalog could not refuse what is missing: list the archive once
        return missing
    catalog.record([ref for ref in rel.refs() if ref not in missing])
    catalog.forget(missing)
    return missing


def describe_missing(release: str | Release, missing: list[ComponentRef]) -> str:
    """`the archive has no m/lora/v9 (publish it first; `warmfleet versions m` lists what it holds)`."""
    rel = release if isinstance(release, Release) else Release.parse(release)
    return (f"the archive has no {', '.join(str(ref) for ref in missing)}; publish it first "
            f"(`warmfleet versions {rel.model}` lists what it holds)")
