"""`warmfleet review A B`: the same prompts and seeds rendered on two releases through the fleet (pinned jobs, marked
as review jobs so no canary counter sees them, no route touched), one side-by-side sheet (PNG, and a self-contained
HTML page with the images inlined), and per-pair figures: pixel difference, SSIM and, for the trained demo releases,
the shape/colour judge of fleetctl/demo/shapes.py."""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetstate.jobstats import REVIEW_HEADER

GENERIC_PROMPTS = ("a leather jacket on a mannequin, studio light", "a bowl of ramen, top view", "a lighthouse at dusk",
                   "a red sneaker on white background")
DEMO_PROMPTS = ("a red circle on the left", "a blue square in the center", "a yellow triangle on the right",
                "a green circle on the right")
"""What the trained demo releases draw (fleetctl/demo/shapes.py), so the judge can tell how each side answers."""
THUMB = 128


@dataclass
class Side:
    release: str
    result: dict[str, Any]
    png: bytes
    verdict: str | None = None  # the demo judge's answer ("ok" or what is off), None where it does not apply


@dataclass
class Pair:
    prompt: str
    seed: int
    a: Side
    b: Side
    figures: dict[str, float] = field(default_factory=dict)


def builtin_prompts(release: str) -> list[str]:
    """The family's prompts: the shapes prompts the trained demo releases draw, else a few generic ones."""
    from fleetctl.demo import trained

    try:
        trained.release_style(release)
    except ValueError:
        return list(GENERIC_PROMPTS)
    return list(DEMO_PROMPTS)


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # skipped."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one a line)")
    return prompts


def send_review(generate: Any, a: str, b: str, prompts: list[str], seeds: list[int], timeout: float = 300,
                **params: Any) -> tuple[list[Pair], float]:
    """Send every (prompt, seed) to both releases, pinned and marked as review jobs; returns the pairs and the
    seconds from the first send to the last result."""
    started = time.perf_counter()
    sent = []
    for prompt in prompts:
        for seed in seeds:
            jobs = [generate.apply_async(kwargs={"prompt": prompt, "seed": seed, "release": r, **params},
                                         headers={REVIEW_HEADER: True}) for r in (a, b)]
            sent.append((prompt, seed, jobs))
    pairs = []
    for prompt, seed, (ja, jb) in sent:
        ra, rb = ja.get(timeout=timeout), jb.get(timeout=timeout)
        pairs.append(Pair(prompt, seed, Side(a, ra, b""), Side(b, rb, b"")))
    return pairs, time.perf_counter() - started


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def ssim(x: np.ndarray, y: np.ndarray, win: int = 7) -> float:
    """Mean structural similarity of two same-size images (grayscale, range 255, a uniform win×win window, the
    constants of Wang et al. 2004; as scikit-image's default, sample covariance)."""
    if x.ndim == 3:
        x, y = x.mean(axis=2), y.mean(axis=2)
    win = min(win, *x.shape) | 1
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean(img: np.ndarray) -> np.ndarray:
        s = np.pad(img, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return (s[win:, win:] - s[:-win, win:] - s[win:, :-win] + s[:-win, :-win]) / win**2

    n = win * win
    mx, my = mean(x), mean(y)
    vx = (mean(x * x) - mx * mx) * n / (n - 1)
    vy = (mean(y * y) - my * my) * n / (n - 1)
    cov = (mean(x * y) - mx * my) * n / (n - 1)
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def compare(png_a: bytes, png_b: bytes) -> dict[str, float]:
    """Mean absolute pixel difference (0-255), share of pixels that differ, and SSIM."""
    x, y = pixels(png_a), pixels(png_b)
    if x.shape != y.shape:
        return {"mean_abs_diff": float("nan"), "changed_share": 1.0, "ssim": float("nan")}
    diff = np.abs(x - y)
    return {"mean_abs_diff": round(float(diff.mean()), 3), "changed_share": round(float((diff.max(axis=2) > 0).mean()), 4),
            "ssim": round(ssim(x, y), 4)}


def judge(release: str, prompt: str, png: bytes) -> str | None:
    """The demo shape/colour judge's verdict where it applies (a trained demo release, a shapes prompt)."""
    from fleetctl.demo import shapes, trained

    try:
        trained.release_style(release)
        parsed = shapes.Prompt.parse(prompt)
    except ValueError:
        return None
    v = shapes.judge(pixels(png) / 255, parsed)
    return "ok" if v.ok else ", ".join(w for w, good in (("colour", v.colour_ok), ("side", v.side_ok)) if not good) + " off"


def evaluate(pairs: list[Pair], read_png: Any) -> None:
    """Fill in each pair's images (read through `read_png(result)`), figures and verdicts."""
    for pair in pairs:
        for side in (pair.a, pair.b):
            side.png = read_png(side.result)
            side.verdict = judge(side.release, pair.prompt, side.png)
        pair.figures = compare(pair.a.png, pair.b.png)


def write_sheet(pairs: list[Pair], path: Path, thumb: int = THUMB) -> Path:
    """A PNG: a header with the two releases, then a row per pair (A, B, prompt, seed and figures)."""
    from PIL import Image, ImageDraw

    pad, text_w, head = 8, 420, 28
    sheet = Image.new("RGB", (pad * 4 + 2 * thumb + text_w, head + pad + len(pairs) * (thumb + pad)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    pen.text((pad, 8), f"A: {pairs[0].a.release}", fill=(0, 0, 0))
    pen.text((pad * 2 + thumb, 18), f"B: {pairs[0].b.release}", fill=(0, 0, 0))
    for i, pair in enumerate(pairs):
        y = head + pad + i * (thumb + pad)
        for j, side in enumerate((pair.a, pair.b)):
            x = pad + j * (thumb + pad)
            image = Image.open(io.BytesIO(side.png)).convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST)
            sheet.paste(image, (x, y))
            pen.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(160, 160, 160))
        tx = pad * 3 + 2 * thumb
        f = pair.figures
        pen.text((tx, y + 10), pair.prompt[:70], fill=(0, 0, 0))
        pen.text((tx, y + 28), f"seed {pair.seed}   SSIM {f['ssim']:.3f}   mean |A-B| {f['mean_abs_diff']:.1f}",
                 fill=(60, 60, 60))
        verdicts = f"judge A {pair.a.verdict or '-'}   B {pair.b.verdict or '-'}"
        pen.text((tx, y + 46), verdicts, fill=(60, 60, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def write_html(pairs: list[Pair], path: Path, seconds: float, thumb: int = THUMB) -> Path:
    """A self-contained page (images as data URIs, no script): prompts, seeds, timings and per-pair figures."""
    e = html.escape
    a, b = pairs[0].a.release, pairs[0].b.release
    rows = []
    for n, p in enumerate(pairs):
        cells = []
        for side in (p.a, p.b):
            t = side.result.get("timings", {})
            cells.append(f'<td><img class="shot" id="img-{n}-{"ab"[len(cells)]}" width="{thumb}" height="{thumb}" '
                         f'src="{_data_uri(side.png)}" alt="{e(side.release)}"><div class="t">inference '
                         f'{t.get("inference_ms", 0):.0f} ms, total {t.get("total_ms", 0):.0f} ms, '
                         f'judge {e(side.verdict or "-")}</div></td>')
        f = p.figures
        rows.append(f"<tr><td>{e(p.prompt)}</td><td>{p.seed}</td>{''.join(cells)}<td>SSIM {f['ssim']:.4f}<br>"
                    f"mean |A-B| {f['mean_abs_diff']:.2f}<br>changed {f['changed_share']:.1%}</td></tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>warmfleet review {e(a)} vs {e(b)}</title>
<style>body{{font-family:sans-serif;margin:16px;background:#fff}} td{{padding:6px;vertical-align:top;
border-bottom:1px solid #ddd}} img{{image-rendering:pixelated;display:block}} .t{{font-size:11px;color:#555}}</style>
</head><body><h1>Review</h1><p>A: <b>{e(a)}</b><br>B: <b>{e(b)}</b><br>{len(pairs)} pairs, {2 * len(pairs)} jobs in
{seconds:.2f} s</p>
<table><tr><th>prompt</th><th>seed</th><th>A</th><th>B</th><th>A vs B</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
