"""An emulated network link between the OSS server and all its clients: a bandwidth cap shared by every
connection (each direction its own, as on a full-duplex line) and a delay added to every request (one round trip:
the request's way out and the first byte's way back).

The cap is a shared reservation clock: a chunk of `n` bytes books `n / rate` seconds after whatever the link was
already booked for (an idle line may run up to BURST bytes ahead), and the sender sleeps until its slot ends. Connections interleave chunk by chunk, so N parallel
downloads share the rate instead of each getting it. What is not emulated: TCP slow start, loss, and the
client's own CPU limits.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

CHUNK = 64 << 10
"""Bytes booked at once: small enough that parallel connections interleave fairly."""
BURST = 256 << 10
"""Bytes the line may carry ahead of the clock (what the socket buffers of a real line hold in flight): the server's
own per-chunk work (digests, disk) overlaps the transfer instead of leaving the line idle after every chunk."""


@dataclass
class LinkStats:
    bytes: int = 0
    first: float | None = None
    last: float = 0.0
    delayed_requests: int = 0
    delay_seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Bytes per second over the span this direction was carrying data (0 before any)."""
        if self.first is None or self.last <= self.first:
            return 0.0
        return self.bytes / (self.last - self.first)


class _Direction:
    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.booked_until = 0.0
        self.stats = LinkStats()

    def take(self, nbytes: int) -> None:
        """Block until `nbytes` may have crossed the link."""
        now = time.monotonic()
        with self.lock:
            if self.stats.first is None:
                self.stats.first = now
            if self.rate:
                start = max(now - BURST / self.rate, self.booked_until)
                self.booked_until = start + nbytes / self.rate
                until = self.booked_until
            else:
                until = now
            self.stats.bytes += nbytes
        if until > now:
            time.sleep(until - now)
        with self.lock:
            self.stats.last = max(self.stats.last, time.monotonic())


class Link:
    """`rate_bps` in bits per second (None: unlimited), `delay_ms` added to each request."""

    def __init__(self, rate_bps: float | None = None, delay_ms: float = 0.0) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError("the link rate must be positive (or None for unlimited)")
        if delay_ms < 0:
            raise ValueError("the link delay cannot be negative")
        self.rate_bps = rate_bps
        self.delay = delay_ms / 1000.0
        bytes_per_s = rate_bps / 8 if rate_bps else None
        self.down = _Direction(bytes_per_s)
        self.up = _Direction(bytes_per_s)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.rate_bps) or self.delay > 0

    def request(self) -> None:
        """The round trip every request pays before its answer starts."""
        if self.delay <= 0:
            return
        started = time.monotonic()
        time.sleep(self.delay)
        with self._lock:
            self.down.stats.delayed_requests += 1
            self.down.stats.delay_seconds += time.monotonic() - started

    def reset_stats(self) -> None:
        for d in (self.down, self.up):
            with d.lock:
                d.stats = LinkStats()

    def describe(self) -> str:
        rate = f"{self.rate_bps / 1e6:g} Mbps" if self.rate_bps else "unlimited"
        return f"{rate}, +{self.delay * 1000:g} ms per request"


_RATE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<scale>[kKmMgG]?)(?P<unit>bit|bps|b|B/s)?")


def parse_rate(text: str) -> float:
    """'100mbit', '100Mbps', '1g', '12.5MB/s' (bytes per second) or a plain number of bits per second → bits/s."""
    match = _RATE.fullmatch(text.strip())
    if not match or float(match["n"]) <= 0:
        raise ValueError(f"cannot read link rate {text!r}: write e.g. 100mbit or 1gbit")
    scale = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}[match["scale"].lower()]
    return float(match["n"]) * scale * (8.0 if match["unit"] == "B/s" else 1.0)
