"""Shared by the bench scripts: merge metrics into bench/results.json and a section into bench/RESULTS.md.

Each script owns its entries (by name) and its section (between markers); everything else is kept as is.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"


def machine() -> str:
    """CPU model and count, OS and Python: enough to tell two result files' machines apart."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{os.cpu_count()}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def entry(name: str, value: float, unit: str, target: str | None = None) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "target": target, "machine": machine(), "date": today()}


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def merge_results(entries: list[dict[str, Any]], path: Path = RESULTS_JSON) -> None:
    """Replace the entries with the same names, keep all others, in their order."""
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        existing = []
    names = {e["name"] for e in entries}
    merged = [e for e in existing if e.get("name") not in names] + entries
    _atomic_write(path, json.dumps(merged, indent=1) + "\n")


def write_section(section: str, markdown: str, path: Path = RESULTS_MD, first: bool = False) -> None:
    """Put `markdown` between `<!-- bench:section -->` markers, replacing an earlier run's section.

    A new section goes at the end, or right after the title and intro when `first` (the suite's summary)."""
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    try:
        text = path.read_text()
    except OSError:
        text = "# Benchmark results\n\nEach section is written by one script in bench/; rerun it to refresh.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    elif first and "\n<!-- bench:" in text:
        head, tail = text.split("\n<!-- bench:", 1)
        text = head.rstrip("\n") + "\n\n" + block + "\n\n<!-- bench:" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    _atomic_write(path, text)


def versions() -> str:
    """The versions that move these numbers most."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "diffusers", "celery", "kombu", "redis"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def stamp() -> str:
    """One line for a section: where and when it was measured, with what, and how busy the shared machine was."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{today()} · {machine()} · {versions()} · load average {load:.1f} at the end of the run"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"
