"""PNG plots for bench/RESULTS.md, where a distribution says more than a number. matplotlib is the `bench` extra."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOTS = Path(__file__).resolve().parent / "plots"


def save_plot(name: str, draw: Callable[[Any], None], size: tuple[float, float] = (6.4, 3.6)) -> str | None:
    """Draw on a fresh axes and save bench/plots/<name>.png; returns the path relative to bench/, or None
    (and a note on stdout) when matplotlib is not installed: figures are still recorded, only the plot is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot {name}: pip install -e '.[bench]' for matplotlib)")
        return None
    PLOTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        fig.tight_layout()
        fig.savefig(PLOTS / f"{name}.png", dpi=110)
    finally:
        plt.close(fig)
    return f"plots/{name}.png"


def image_line(path: str | None, alt: str) -> str:
    return f"![{alt}]({path})" if path else f"(plot `{alt}` not drawn: matplotlib missing)"
