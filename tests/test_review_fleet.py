"""`warmfleet review` of the two demo releases through real workers: the sheet, the self-contained page (opened in
headless Chromium: every image shows), the per-pair figures, provenance in the PNGs, and nothing counted or rerouted."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import redis
from PIL import Image

from fleetctl.review import THUMB, compare, ssim
from fleetstate import jobstats
from fleetstate.routes import RouteTable
from workers.outputs import read_uri

from .support import run_cli

pytestmark = pytest.mark.integration


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.fail("headless Chromium is needed (apt-get install -y chromium)")
    return found


def screenshot(page, out, width: int = 1100, height: int = 1400) -> np.ndarray:
    shot = out / "shot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(shot).convert("RGB"))


def shown_at(screen: np.ndarray, png: bytes) -> tuple[int, int] | None:
    """Where the image, drawn at THUMB px nearest-neighbour (as the page asks), sits pixel for pixel in the screen."""
    thumb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((THUMB, THUMB), Image.Resampling.NEAREST))
    probe = THUMB // 2
    needle = thumb[probe].tobytes()
    for y in range(screen.shape[0] - THUMB + probe + 1):
        row = screen[y].tobytes()
        start = row.find(needle)
        while start != -1:
            if start % 3 == 0:
                x, top = start // 3, y - probe
                if top >= 0 and np.array_equal(screen[top:top + THUMB, x:x + THUMB], thumb):
                    return top, x
            start = row.find(needle, start + 1)
    return None


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (32, 32, 3)).astype(float)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, np.clip(x + rng.normal(0, 40, x.shape), 0, 255)) < 0.9


def test_review_of_the_demo_releases(fleet_settings, producer, two_workers, tmp_path):
    old, new = two_workers["releases"]
    client = redis.Redis.from_url(fleet_settings.broker_url)
    table = RouteTable(client)
    route_before, history_before = table.get(old.split("@")[0]), len(table.history(count=1000))
    counted_before = {r: jobstats.read(client, r) for r in (old, new)}

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# demo prompts\na red circle on the left\n\na blue square in the center\n")
    out = tmp_path / "review"
    result = run_cli(fleet_settings, "review", old, new, "--prompts", str(prompts), "--seed", "7", "--seed", "8",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "review.json").read_text())
    assert [(p["prompt"], p["seed"]) for p in data["pairs"]] == [
        ("a red circle on the left", 7), ("a red circle on the left", 8),
        ("a blue square in the center", 7), ("a blue square in the center", 8)]
    images = []
    for pair in data["pairs"]:
        a, b = read_uri(pair["a"]), read_uri(pair["b"])
        images += [a, b]
        assert pair["ssim"] == compare(a, b)["ssim"] < 0.99 and pair["mean_abs_diff"] > 0  # two looks, not one
        assert pair["judge_a"] is not None and pair["judge_b"] is not None  # trained demo releases: judged
        for png, release in ((a, old), (b, new)):
            image = Image.open(io.BytesIO(png))
            image.load()
            assert image.text["warmfleet:release"] == release and image.text["warmfleet:seed"] == str(pair["seed"])
            assert image.text["warmfleet:prompt"] == pair["prompt"]
            assert f"Seed: {pair['seed']}" in image.text["parameters"] and f"Model: {release}" in image.text["parameters"]

    # the sheet and the page
    sheet = Image.open(out / "review.png")
    assert sheet.size[1] > 4 * THUMB
    page = (out / "review.html").read_text()
    assert page.count('src="data:image/png;base64,') == 8 and not re.search(r'src="(?!data:)', page)
    screen = screenshot(out / "review.html", tmp_path)
    places = [shown_at(screen, png) for png in images]
    assert all(p is not None for p in places), places
    assert len(set(places)) == 8  # eight images, each in its own place

    # review jobs leave the route and the canary counters alone
    assert table.get(old.split("@")[0]) == route_before and len(table.history(count=1000)) == history_before
    for release, before in counted_before.items():
        now = jobstats.read(client, release)
        assert (now.served, now.failures) == (before.served, before.failures)
