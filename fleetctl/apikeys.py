"""The HTTP API's clients: one key each, kept only as its SHA-256 (the keys are 32 random bytes: a fast hash of a key
that cannot be guessed is as safe as a slow one), in a 0600 JSON file; and the per-key limits the API applies.

A key reads `wf_<client>_<secret>`; the file maps the SHA-256 of the whole key to the client's name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path

CLIENT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class KeyError_(ValueError):  # noqa: N801 - not the builtin KeyError
    pass


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeys:
    """The key file: add, remove, list, and look a presented key up (by its hash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: tuple[float, dict[str, str]] | None = None

    def _read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text()).get("clients", {})
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KeyError_(f"cannot read the API key file {self.path}: {exc}") from None

    def _write(self, clients: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"clients": clients}, indent=1))
        os.replace(tmp, self.path)

    def add(self, client: str) -> str:
        """A new key for `client` (replacing its old one): returned once, stored only hashed."""
        if not CLIENT_PATTERN.match(client):
            raise KeyError_(f"bad client name {client!r}: lower-case letters, digits, '.', '_' or '-', at most 64")
        key = f"wf_{client}_{secrets.token_urlsafe(32)}"
        clients = self._read()
        clients[client] = {"sha256": digest(key), "created": time.time()}
        self._write(clients)
        return key

    def remove(self, client: str) -> bool:
        clients = self._read()
        if clients.pop(client, None) is None:
            return False
        self._write(clients)
        return True

    def clients(self) -> list[str]:
        return sorted(self._read())

    def client_of(self, key: str | None) -> str | None:
        """The client a presented key belongs to, or None. The file is re-read when it changes (mtime)."""
        if not key:
            return None
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if self._loaded is None or self._loaded[0] != mtime:
            self._loaded = (mtime, {v["sha256"]: name for name, v in self._read().items()})
        presented = digest(key)
        for stored, name in self._loaded[1].items():
            if hmac.compare_digest(stored, presented):
                return name
        return None


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `per_minute`."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = time.monotonic()
        with self.lock:
            tokens, at = self.buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self.buckets[client] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self.buckets[client] = (tokens - 1.0, now)
            return 0.0


class UrlSigner:
    """Signed, expiring image URLs: HMAC-SHA256 over the job id and the expiry time."""

    def __init__(self, secret: str | None, ttl: float) -> None:
        self.secret = (secret or secrets.token_urlsafe(32)).encode()
        self.ttl = ttl

    def sign(self, job_id: str, now: float | None = None) -> tuple[int, str]:
        expires = int((now or time.time()) + self.ttl)
        return expires, self._mac(job_id, expires)

    def _mac(self, job_id: str, expires: int) -> str:
        return hmac.new(self.secret, f"{job_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def check(self, job_id: str, expires: str | None, signature: str | None) -> str | None:
        """None when the URL is good, else why it is not."""
        try:
            when = int(expires or "")
        except ValueError:
            return "the image URL has no valid expiry"
        if not signature or not hmac.compare_digest(self._mac(job_id, when), signature):
            return "the image URL's signature is wrong"
        if when < time.time():
            return "the image URL has expired; ask for the generation again for a fresh one"
        return None


def job_id_for(client: str, secret: bytes) -> str:
    """A fresh job id that names its client without saying it: a UUID whose last 8 bytes are an HMAC of the client
    and the first 8 (so any API process with the same secret can tell whose a job is, with no state)."""
    head = secrets.token_bytes(8)
    tail = hmac.new(secret, client.encode() + head, hashlib.sha256).digest()[:8]
    raw = (head + tail).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def owns(client: str, job_id: str, secret: bytes) -> bool:
    raw = job_id.replace("-", "")
    if len(raw) != 32 or not re.fullmatch(r"[0-9a-f]{32}", raw):
        return False
    head = bytes.fromhex(raw[:16])
    return hmac.compare_digest(raw[16:], hmac.new(secret, client.encode() + head, hashlib.sha256).digest()[:8].hex())
