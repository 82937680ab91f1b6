"""The cache event log: one JSON line per event, appended, readable by people and by machines.

    {"ts": 1763712000.1, "event": "L2_SYNC", "model": "nano-banana", "version": "v1.1.0", ..., "outcome": "UPDATED"}
renders as
    2026-11-21 02:00:00 L2_SYNC model=nano-banana version=v1.1.0 bytes_fetched=12.1MB bytes_reused=6.8GB → UPDATED
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SIZE_FIELDS = {"bytes", "bytes_fetched", "bytes_reused", "bytes_total", "from_peers", "from_l3"}


class EventLog:
    def __init__(self, path: Path | str | None, node: str | None = None,
                 sinks: list[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.path = Path(path) if path else None
        self.node = node or socket.gethostname()
        self.sinks = list(sinks or [])

    def emit(self, event: str, outcome: str | None = None, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"ts": round(time.time(), 3), "event": event, "node": self.node, **fields}
        if outcome:
            record["outcome"] = outcome
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = (json.dumps(record, default=str, sort_keys=False) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)  # one write of one line: appends from several processes do not interleave
            finally:
                os.close(fd)
        for sink in self.sinks:
            sink(record)
        return record

    def read(self, last: int | None = None) -> list[dict[str, Any]]:
        records = list(self.iter())
        return records[-last:] if last else records

    def iter(self) -> Iterator[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from a killed writer is skipped, not fatal


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n}"


def render(record: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("ts", 0)))
    parts = [stamp, str(record.get("event", "?"))]
    for key, value in record.items():
        if key in ("ts", "event", "outcome", "node"):
            continue
        if key in SIZE_FIELDS and isinstance(value, int | float):
            value = human_bytes(value)
        elif key == "by_peer" and isinstance(value, dict):  # node → bytes it sent
            value = ",".join(f"{node}:{human_bytes(n)}" for node, n in value.items())
        parts.append(f"{key}={value}")
    if "outcome" in record:
        parts.append(f"→ {record['outcome']}")
    return " ".join(parts)
