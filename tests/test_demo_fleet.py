"""The trained demo through a real fleet: workers draw what the prompt asks, and a rollback or a canary changes the
look as the versions were trained to. The previous release (base v1.0.0 + LoRA v2.3.0) draws outlined shapes on
white, the active one (base v1.1.0 + LoRA v2.3.1) filled shapes on gray.

Every check runs twice, on a fleet serving the trained weights and on one serving the random-weight versions of the
same releases: the trained fleet must pass each check and the random one must fail it, so a pass means the weights
learned the look, not that a bar is low."""

from __future__ import annotations

import io

import numpy as np
import pytest
import redis

from fleetctl.demo import shapes
from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES
from fleetctl.demo.trained import release_style
from fleetstate.rollout import rollback
from fleetstate.routes import RouteTable
from workers.outputs import read_uri

from .support import RedisServer

pytestmark = pytest.mark.integration

OLD, NEW = DEMO_RELEASES
PROMPTS = [shapes.Prompt(s, c, p).text for s, c, p in
           [("circle", "red", "left"), ("square", "blue", "right"), ("triangle", "yellow", "center"),
            ("square", "green", "left"), ("circle", "yellow", "right"), ("triangle", "red", "left"),
            ("circle", "blue", "center"), ("triangle", "green", "right")]]
FOLLOWS = 0.75
"""Of the prompts, the share whose image has the asked colour dominating the shape, and the share with the shape on
the asked side (shapes.judge), each at least this: the trained releases measure 8/8 and 8/8."""


@pytest.fixture(scope="module", params=["trained", "random"])
def weights(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def redis_server(weights: str, tmp_path_factory: pytest.TempPathFactory):
    """A broker per fleet: the trained and the random fleet share no route, queue or warm record."""
    server = RedisServer(tmp_path_factory.mktemp(f"redis-{weights}")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_archive_dir(weights: str, tmp_path_factory: pytest.TempPathFactory):
    """The nano-banana versions, as `./fleet demo` publishes them (trained) or as the suite's shared archive holds
    them (seeded random weights), under the same release names."""
    from cachemgr import LocalArchive
    from fleetctl.demo.builders import DEMO_VERSIONS, RANDOM_DEMO_VERSIONS, publish_demo

    versions = DEMO_VERSIONS if weights == "trained" else RANDOM_DEMO_VERSIONS
    root = tmp_path_factory.mktemp(f"archive-{weights}")
    publish_demo(LocalArchive(root), tmp_path_factory.mktemp(f"build-{weights}"),
                 versions=[v for v in versions if v.model == DEMO_MODEL], log=lambda *_: None)
    return root


def _results(producer, n: int = len(PROMPTS)) -> list[dict]:
    """The prompts (cycled to `n` jobs; job i seeded i) through generate.delay, routed by the route table."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    jobs = [producer.generate.delay(p, seed=i) for i, p in enumerate(prompts)]
    return [j.get(timeout=180) for j in jobs]


def _draw(producer, n: int = len(PROMPTS)) -> tuple[list[str], list[shapes.Verdict]]:
    """The releases that served the jobs and the judge's verdicts on their images."""
    results = _results(producer, n)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    verdicts = [shapes.judge(io.BytesIO(read_uri(r["image_uri"])), p) for r, p in zip(results, prompts, strict=True)]
    return [r["release"] for r in results], verdicts


def _follows(verdicts: list[shapes.Verdict]) -> tuple[bool, dict[str, float]]:
    rates = {k: float(np.mean([getattr(v, k) for v in verdicts])) for k in ("colour_ok", "side_ok")}
    return all(r >= FOLLOWS for r in rates.values()), rates


def _looks_as_designed(release: str, verdicts: list[shapes.Verdict]) -> tuple[bool, shapes.Look]:
    look = shapes.Look.of(verdicts)
    return look.matches(shapes.STYLES[release_style(release)]), look


def test_the_active_release_draws_what_it_is_asked_in_its_look(producer, two_workers, weights):
    trained = weights == "trained"
    served, verdicts = _draw(producer)
    assert set(served) == {NEW}
    follows, rates = _follows(verdicts)
    assert follows is trained, (weights, rates)
    designed, look = _looks_as_designed(NEW, verdicts)
    assert designed is trained, (weights, look)


def test_a_rollback_brings_back_the_previous_look_and_a_promote_the_new(fleet_settings, producer, two_workers,
                                                                       weights):
    trained = weights == "trained"
    client = redis.Redis.from_url(fleet_settings.broker_url)
    rollback(client, DEMO_MODEL, actor="test")
    try:
        served, verdicts = _draw(producer)
        assert set(served) == {OLD}
        follows, rates = _follows(verdicts)
        assert follows is trained, (weights, rates)
        designed, old_look = _looks_as_designed(OLD, verdicts)
        assert designed is trained, (weights, old_look)
    finally:
        RouteTable(client).set_active(NEW, actor="test")
    served, verdicts = _draw(producer)
    assert set(served) == {NEW}
    designed, new_look = _looks_as_designed(NEW, verdicts)
    assert designed is trained, (weights, new_look)


def test_a_canary_serves_each_release_in_its_own_look(fleet_settings, producer, two_workers, weights):
    """A full canary of the previous release turns every image to its look; at 50 % each image has the look of the
    release that drew it (its background level: white ≈ 1 for the outlined release, gray ≈ 0.5 for the filled)."""
    trained = weights == "trained"
    table = RouteTable(redis.Redis.from_url(fleet_settings.broker_url))
    table.set_canary(OLD, 100, actor="test")
    try:
        served, verdicts = _draw(producer)
        assert set(served) == {OLD}
        designed, look = _looks_as_designed(OLD, verdicts)
        assert designed is trained, (weights, look)
        table.set_canary(OLD, 50, actor="test")
        served, verdicts = _draw(producer, 16)
    finally:
        table.clear_canary(DEMO_MODEL, actor="test")
    assert {OLD, NEW} == set(served), served  # 16 jobs at 50 %: one release missing has odds 2**-15
    own = [_closer_to_own_background(r, v) for r, v in zip(served, verdicts, strict=True)]
    figures = [(r, round(v.background, 2)) for r, v in zip(served, verdicts, strict=True)]
    assert bool(np.mean(own) >= 0.9) is trained, (weights, figures)


def _background(release: str) -> float:
    return float(np.mean(shapes.STYLES[release_style(release)].background)) / 255


def _closer_to_own_background(release: str, verdict: shapes.Verdict) -> bool:
    """One image's border is nearer the background its release was trained to draw than the other release's."""
    other = NEW if release == OLD else OLD
    return abs(verdict.background - _background(release)) < abs(verdict.background - _background(other))


def test_the_contact_sheet_shows_each_jobs_image_prompt_and_release(fleet_settings, producer, two_workers, tmp_path):
    from PIL import Image

    from fleetctl.demo.sheet import THUMB, contact_sheet, read_image

    results = _results(producer, 3)
    prompts = PROMPTS[:3]
    rows = [(p, r["release"], read_image(r, fleet_settings.resolved_output_url)) for p, r in zip(prompts, results, strict=True)]
    sheet = np.asarray(Image.open(contact_sheet(rows, tmp_path / "sheet.png")).convert("RGB"), dtype=np.int16)
    assert sheet.shape[0] == 8 + 3 * (THUMB + 8)
    for i, (_, _, png) in enumerate(rows):
        image = Image.open(io.BytesIO(png)).convert("RGB").resize((THUMB, THUMB), Image.Resampling.NEAREST)
        y = 8 + i * (THUMB + 8)
        assert np.array_equal(sheet[y:y + THUMB, 8:8 + THUMB], np.asarray(image, dtype=np.int16)), i
    text = sheet[:, 8 * 2 + THUMB:]
    assert (text.sum(-1) < 300).any()  # the prompt and release are written in dark ink beside the images
