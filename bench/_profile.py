"""`--profile` for the bench scripts: one run under cProfile, in every thread it starts, summed by phase.

cProfile sees one thread; a sync fetches files and parts on worker threads, so each new thread gets its own
profiler and the stats are merged. Times inside worker threads are per thread: phases that run in parallel
can add up to more than the wall time. cProfile also slows Python-heavy code (module construction) far more
than C-heavy code (hashing, copying): read shares within one profile, and take wall times from the timed runs.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = f"{Path(__file__).resolve().parents[1]}/"

WAITING = {"<method 'get' of '_queue.SimpleQueue' objects>", "<method 'acquire' of '_thread.lock' objects>"}
"""A thread waiting for another (pool queues, futures, joins): left out of the top functions."""

Phase = tuple[str, str, str]
"""(label, a fragment of the function's file name, the function's name): the function's cumulative time."""


def profiled(run: Callable[[], Any]) -> pstats.Stats:
    """Run `run()` with cProfile on in this thread and in every thread started meanwhile; merged stats."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        with lock:
            profiles.append(profile)
        profile.enable()

    main = cProfile.Profile()
    threading.setprofile(start)
    main.enable()
    try:
        run()
    finally:
        main.disable()
        threading.setprofile(None)
    stats = pstats.Stats(main)
    with lock:
        for profile in profiles:
            stats.add(profile)
    return stats


def phase_seconds(stats: pstats.Stats, phases: list[Phase]) -> list[tuple[str, float, int]]:
    """(label, cumulative seconds summed over threads, calls) of each phase's function."""
    out = []
    for label, file_part, name in phases:
        seconds, calls = 0.0, 0
        for (filename, _, funcname), (_, ncalls, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            if funcname == name and file_part in filename:
                seconds += cumtime
                calls += ncalls
        out.append((label, seconds, calls))
    return out


def top_functions(stats: pstats.Stats, count: int = 15) -> list[tuple[str, float, int]]:
    """The functions with the most time in their own body (not in what they call), summed over threads; threads
    waiting on each other are left out."""
    rows = []
    for (filename, line, funcname), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if funcname in WAITING:
            continue
        where = funcname if filename == "~" else f"{_short(filename)}:{line}({funcname})"
        rows.append((where, tottime, ncalls))
    return sorted(rows, key=lambda r: r[1], reverse=True)[:count]


def _short(filename: str) -> str:
    for marker in ("site-packages/", ROOT, "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def report(title: str, stats: pstats.Stats, phases: list[Phase], wall_s: float) -> str:
    """Markdown: the phases' seconds and share of the profiled wall time, then the top functions by own time."""
    lines = [f"**{title}** (one run under cProfile: {wall_s:.2f} s wall; shares are of that wall time)", "",
             "| phase (function) | s under cProfile | share of wall | calls |", "|---|---|---|---|"]
    for label, seconds, calls in phase_seconds(stats, phases):
        lines.append(f"| {label} | {seconds:.2f} | {seconds / wall_s:.0%} | {calls} |")
    lines += ["", "| function (own time, all threads, waits left out) | s | calls |", "|---|---|---|"]
    for where, seconds, calls in top_functions(stats):
        lines.append(f"| `{where}` | {seconds:.2f} | {calls} |")
    return "\n".join(lines)


def dump(stats: pstats.Stats, count: int = 30) -> str:
    """pstats' own listing by cumulative time, for stdout."""
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(count)
    return buffer.getvalue()
