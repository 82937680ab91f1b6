"""The synthetic world the demo models learn: coloured shapes on the left, in the center or on the right.

It holds both sides of the contract: `draw` makes the training images, `judge` scores a generated image
against its prompt, so a test can say whether a model drew what it was asked.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 200, 30),
}
POSITIONS = ("left", "center", "right")
_CENTRE_X = {"left": 0.28, "center": 0.5, "right": 0.72}
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Prompt:
    shape: str
    colour: str
    position: str

    @property
    def text(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.colour} {self.shape} {where}"

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """The prompt a caption spells; raises ValueError for anything else."""
        m = re.fullmatch(r"an? (\w+) (\w+) (?:on the|in the) (\w+)", text.strip().lower())
        if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in POSITIONS:
            raise ValueError(f"not a shapes prompt: {text!r}")
        return cls(m[2], m[1], m[3])


@dataclass(frozen=True)
class Style:
    """How a version draws: the look that tells versions apart."""

    background: tuple[int, int, int]
    outline: bool = False
    scale: float = 1.0  # shape size, relative to the filled styles'
    line: float = 0.09  # outline width, as a share of the image side


STYLES = {
    "white": Style((255, 255, 255)),
    "black": Style((0, 0, 0)),
    "outline": Style((255, 255, 255), outline=True, scale=1.3, line=0.08),
    "gray": Style((128, 128, 128)),
}


def all_prompts() -> list[Prompt]:
    return [Prompt(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def draw(prompt: Prompt, style: Style, rng: np.random.Generator | None = None, size: int = SIZE) -> np.ndarray:
    """One image (H×W×3 uint8); `rng` jitters place and size, None draws the canonical one."""
    from PIL import Image, ImageDraw

    jx, jy, jr = rng.uniform(-1, 1, 3) if rng is not None else (0.0, 0.0, 0.0)
    scale = 4  # drawn large and box-filtered down: smooth, deterministic edges
    big = size * scale
    cx = (_CENTRE_X[prompt.position] + 0.05 * jx) * big
    cy = (0.5 + 0.12 * jy) * big
    r = (0.22 + 0.03 * jr) * style.scale * big
    img = Image.new("RGB", (big, big), style.background)
    pen = ImageDraw.Draw(img)
    colour = COLOURS[prompt.colour]
    fill, outline, width = (None, colour, int(style.line * big)) if style.outline else (colour, None, 0)
    if prompt.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif prompt.shape == "square":
        h = r * 0.88
        pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill, outline=outline, width=width)
    else:
        h = r * 1.15
        pts = [(cx, cy - h), (cx + h * 0.95, cy + h * 0.75), (cx - h * 0.95, cy + h * 0.75)]
        if style.outline:
            pen.line(pts + [pts[0], pts[1]], fill=colour, width=width, joint="curve")
        else:
            pen.polygon(pts, fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def dataset(style: Style, n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    """`n` jittered images cycling through every prompt, and their captions; the same seed, the same bytes."""
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    order = [prompts[i % len(prompts)] for i in range(n)]
    images = np.stack([draw(p, style, rng, size) for p in order])
    return images, [p.text for p in order]


@dataclass(frozen=True)
class Verdict:
    """How one image answers its prompt. `colour_share`: of the chromatic foreground, how much has the asked hue;
    `centre_x`: the foreground's centroid, 0 left to 1 right; `foreground`: the share of pixels that are not
    background; `centre_fill`: how much of the middle of the foreground's box is foreground (low for outlines)."""

    colour_share: float
    centre_x: float
    foreground: float
    centre_fill: float
    background: float
    colour_ok: bool
    side_ok: bool

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.side_ok


MIN_FOREGROUND, MAX_FOREGROUND = 0.03, 0.45
"""A drawn shape covers 5-25 % of the image; noise (random weights) covers most of it."""
MIN_COLOUR_SHARE = 0.6
SIDE_BANDS = {"left": (0.0, 0.42), "center": (0.4, 0.6), "right": (0.58, 1.0)}


def to_array(image) -> np.ndarray:
    """A PIL image, a path or an H×W×3 array as float RGB in [0, 1]."""
    from PIL import Image

    if not isinstance(image, np.ndarray):
        image = np.asarray(Image.open(image).convert("RGB") if not isinstance(image, Image.Image) else image.convert("RGB"))
    a = np.asarray(image, dtype=np.float64)
    return a / 255.0 if a.max() > 1.0 or image.dtype == np.uint8 else a


def _border(a: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate([a[:width].reshape(-1, 3), a[-width:].reshape(-1, 3),
                           a[:, :width].reshape(-1, 3), a[:, -width:].reshape(-1, 3)])


def background_level(image) -> float:
    """Mean brightness of the image's border, where no shape is drawn: 1 white, 0 black."""
    return float(_border(to_array(image)).mean())


def foreground_mask(a: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Pixels far (RGB distance) from the border's median colour."""
    bg = np.median(_border(a), axis=0)
    return np.linalg.norm(a - bg, axis=-1) > threshold


def _hue_names(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel: is it chromatic (saturated and lit), and the index of the nearest named hue."""
    mx, mn = pixels.max(-1), pixels.min(-1)
    chroma = mx - mn
    chromatic = (chroma > 0.25) & (mx > 0.3)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    centres = np.array(list(_HUES.values()))
    dist = np.abs((hue[..., None] - centres + 180) % 360 - 180)
    return chromatic, dist.argmin(-1)


def judge(image, prompt: Prompt | str) -> Verdict:
    """Score an image against its prompt: does the asked colour dominate the shape, is the shape on the asked side."""
    if isinstance(prompt, str):
        prompt = Prompt.parse(prompt)
    a = to_array(image)
    h, w, _ = a.shape
    mask = foreground_mask(a)
    fg = float(mask.mean())
    sized = MIN_FOREGROUND <= fg <= MAX_FOREGROUND
    chromatic, names = _hue_names(a[mask])
    asked = list(COLOURS).index(prompt.colour)
    share = float((names[chromatic] == asked).mean()) if chromatic.any() else 0.0
    if mask.any():
        ys, xs = np.nonzero(mask)
        centre_x = float((xs.mean() + 0.5) / w)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        dy, dx = (y1 - y0) * 0.3, (x1 - x0) * 0.3
        inner = mask[int(round(y0 + dy)):max(int(round(y1 - dy)), int(round(y0 + dy)) + 1),
                     int(round(x0 + dx)):max(int(round(x1 - dx)), int(round(x0 + dx)) + 1)]
        centre_fill = float(inner.mean())
    else:
        centre_x, centre_fill = 0.5, 0.0
    lo, hi = SIDE_BANDS[prompt.position]
    return Verdict(
        colour_share=share,
        centre_x=centre_x,
        foreground=fg,
        centre_fill=centre_fill,
        background=float(_border(a).mean()),
        colour_ok=sized and share >= MIN_COLOUR_SHARE,
        side_ok=sized and lo <= centre_x <= hi,
    )


def pass_rate(verdicts: list[Verdict]) -> float:
    return sum(v.ok for v in verdicts) / max(len(verdicts), 1)


BACKGROUND_TOLERANCE = 0.15
"""How far a version's mean border brightness may sit from its style's background (white 1, gray 0.5, black 0)."""
OUTLINE_MAX_FILL, FILLED_MIN_FILL = 0.45, 0.8
"""Mean centre_fill of an outlined look (drawn outlines: 0.12) and of a filled one (drawn shapes: 0.99)."""
MIN_DRAWN = 0.75
"""A look is a look of drawn shapes: at least this share of the images has a shape-sized foreground (a blank white
image has a white border and nothing in the middle, yet it is no outline)."""


@dataclass(frozen=True)
class Look:
    """The pixel statistics that tell the versions' looks apart, over a batch of images."""

    background: float  # mean border brightness: 1 white, 0 black
    centre_fill: float  # mean share of the middle of the shape's box that is shape: low for outlines
    drawn: float  # share of images whose foreground is shape-sized (MIN_FOREGROUND..MAX_FOREGROUND)

    @classmethod
    def of(cls, verdicts: list[Verdict]) -> Look:
        return cls(float(np.mean([v.background for v in verdicts])), float(np.mean([v.centre_fill for v in verdicts])),
                   float(np.mean([MIN_FOREGROUND <= v.foreground <= MAX_FOREGROUND for v in verdicts])))

    def matches(self, style: Style) -> bool:
        """Shapes drawn, the background within BACKGROUND_TOLERANCE of the style's, outlined or filled as the style is."""
        level = float(np.mean(style.background)) / 255
        fill = self.centre_fill < OUTLINE_MAX_FILL if style.outline else self.centre_fill > FILLED_MIN_FILL
        return self.drawn >= MIN_DRAWN and abs(self.background - level) <= BACKGROUND_TOLERANCE and fill
