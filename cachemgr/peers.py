"""Peers: a node serves its verified L2 blobs, read-only, to the other nodes of its site, and asks them for bytes.

    GET  /blobs/<sha256>    (Range: bytes=a-b allowed)    the bytes of a verified blob
    HEAD /blobs/<sha256>                                  200 when this node holds the blob, else 404

Blobs are addressed by their sha256 only, never by a path: the server opens `blobs/<sha256>` of its store and
nothing else, so a temp file (tmp/), a quarantined blob (quarantine/) or any other file cannot be named. Every
request carries an HMAC-SHA256 of method, path, Range header and an expiry, keyed by the fleet's peer secret;
an unsigned, wrongly signed or expired request is refused with 403 before the path is looked at.

Trust does not rest on the peer: whoever sends bytes, the syncing node checks every piece against the manifest
(see `cachemgr.peersync`). The secret only keeps others from reading the L2 or wasting its upload.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import re
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from .store import SnapshotStore

BLOB_PATH = re.compile(r"/blobs/([0-9a-f]{64})")
RANGE = re.compile(r"bytes=(\d+)-(\d+)")
HDR_EXPIRES = "X-Fleet-Expires"
HDR_SIGNATURE = "X-Fleet-Signature"
SIGNATURE_TTL = 60
"""Seconds a client's signature stays valid."""
MAX_TTL = 600
"""A signature claiming to be valid longer than this is refused (it would be a replayable key)."""
SEND_CHUNK = 256 << 10


RATE_GRACE = 0.5
"""Seconds a request to a peer gets for connecting and its first bytes before its rate is judged."""
READ_CHUNK = 64 << 10


class PeerError(OSError):
    """A peer that could not answer: gone, slow, refused us, or sent a short or malformed body. `kind` says which:
    timeout (silent for the read timeout), slow (under the minimum rate), refused (our signature), error (the rest)."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0])


def signature(secret: str, method: str, path: str, byte_range: str, expires: int) -> str:
    message = f"{method}\n{path}\n{byte_range}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class _Pacer:
    """The upload rate this node gives its peers (bytes/s, shared by every connection); None = unlimited."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.booked_until = 0.0

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        with self.lock:
            start = max(now, self.booked_until)
            self.booked_until = start + nbytes / self.rate
            until = self.booked_until
        if until > now:
            time.sleep(until - now)


@dataclass
class ServerStats:
    bytes_served: int = 0
    requests_served: int = 0
    requests_refused: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"
    server_version = "warmfleet-peer"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _refuse(self, code: int, reason: str) -> None:
        with self.server.lock:
            self.server.stats.requests_refused += 1
        body = reason.encode() if self.command == "GET" else b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _authentic(self) -> bool:
        try:
            expires = int(self.headers.get(HDR_EXPIRES, ""))
        except ValueError:
            return False
        now = time.time()
        if expires < now or expires > now + MAX_TTL:
            return False
        given = self.headers.get(HDR_SIGNATURE, "")
        wanted = signature(self.server.secret, self.command, self.path, self.headers.get("Range", ""), expires)
        return hmac.compare_digest(given, wanted)

    def _serve(self, body: bool) -> None:
        if not self._authentic():
            return self._refuse(403, "missing, wrong or expired signature")
        match = BLOB_PATH.fullmatch(self.path)
        if match is None:
            return self._refuse(404, "only /blobs/<sha256> is served")
        blob = self.server.store.blob_path(match.group(1))
        try:
            fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return self._refuse(404, "no such blob")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return self._refuse(404, "no such blob")
            start, end, code = 0, info.st_size, 200
            wanted = self.headers.get("Range")
            if wanted is not None:
                r = RANGE.fullmatch(wanted.strip())
                if r is None or int(r.group(1)) > int(r.group(2)) or int(r.group(2)) >= info.st_size:
                    return self._refuse(416, "range not satisfiable")
                start, end, code = int(r.group(1)), int(r.group(2)) + 1, 206
            self.send_response(code)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Type", "application/octet-stream")
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{info.st_size}")
            self.end_headers()
            if not body:
                return None
            position = start
            while position < end:
                n = min(SEND_CHUNK, end - position)
                self.server.pacer.take(n)
                data = os.pread(fd, n, position)
                if not data:
                    break
                self.wfile.write(data)
                position += len(data)
            with self.server.lock:
                self.server.stats.bytes_served += position - start
                self.server.stats.requests_served += 1
            return None
        finally:
            os.close(fd)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], store: SnapshotStore, secret: str, pacer: _Pacer) -> None:
        self.store = store
        self.secret = secret
        self.pacer = pacer
        self.stats = ServerStats()
        self.lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a peer hanging up mid-body is routine
            super().handle_error(request, client_address)


class PeerServer:
    """Serves `store`'s verified blobs on `host:port` (port 0 = any free one) to holders of `secret`.

    `upload_rate` (bytes/s) bounds what this node gives all its peers together, so serving never starves the
    node's own work."""

    def __init__(self, store: SnapshotStore, secret: str, host: str = "127.0.0.1", port: int = 0,
                 upload_rate: float | None = None) -> None:
        if not secret:
            raise ValueError("a peer server needs a secret: set FLEET_PEER_SECRET to the same value on every node")
        self.store = store
        self.secret = secret
        self.host = host
        self.port = port
        self.pacer = _Pacer(upload_rate)
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PeerServer:
        self._http = _HttpServer((self.host, self.port), self.store, self.secret, self.pacer)
        self.host, self.port = self._http.server_address[0], self._http.server_address[1]
        http_server = self._http
        self._thread = threading.Thread(target=lambda: http_server.serve_forever(poll_interval=0.1),
                                        name=f"peer-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http = self._thread = None

    @property
    def stats(self) -> ServerStats:
        return self._http.stats if self._http else ServerStats()

    @property
    def bound(self) -> tuple[str, int]:
        """The address the listening socket is bound to, as the kernel reports it."""
        if self._http is None:
            raise RuntimeError("the peer server is not running")
        return self._http.socket.getsockname()[:2]

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class PeerClient:
    """Asks one peer (`host:port`) for blobs. Every failure is a PeerError; the caller drops the peer.

    `min_rate` (bytes/s; None = no floor) is the least a GET must deliver: after RATE_GRACE seconds for connecting
    and the first bytes, a request that has received fewer than (elapsed - RATE_GRACE) × min_rate bytes is given up
    (kind "slow"), so a peer that keeps sending, but slowly, costs a range about RATE_GRACE, not its whole transfer.
    `timeout` bounds any single silent wait (connect, headers, a read)."""

    def __init__(self, node: str, address: str, secret: str, timeout: float = 10.0,
                 min_rate: float | None = None) -> None:
        self.node = node
        self.address = address
        self.secret = secret
        self.timeout = timeout
        self.min_rate = min_rate or None
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)

    def __repr__(self) -> str:
        return f"PeerClient({self.node}@{self.address})"

    def _headers(self, method: str, path: str, byte_range: str) -> dict[str, str]:
        expires = int(time.time()) + SIGNATURE_TTL
        headers = {HDR_EXPIRES: str(expires),
                   HDR_SIGNATURE: signature(self.secret, method, path, byte_range, expires)}
        if byte_range:
            headers["Range"] = byte_range
        return headers

    def _fail(self, exc: BaseException) -> PeerError:
        kind = "timeout" if isinstance(exc, TimeoutError) else "error"
        return PeerError(f"peer {self.node} at {self.address}: {type(exc).__name__}: {exc}", kind)

    def _request(self, method: str, sha256: str, byte_range: str = "") -> tuple[int, bytes]:
        path = f"/blobs/{sha256}"
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(method, path, headers=self._headers(method, path, byte_range))
            response = conn.getresponse()
            body = response.read() if method == "GET" else b""
            return response.status, body
        except (OSError, http.client.HTTPException) as exc:
            raise self._fail(exc) from exc
        finally:
            conn.close()

    def has(self, sha256: str) -> bool:
        status, _ = self._request("HEAD", sha256)
        if status == 403:
            raise PeerError(f"peer {self.node} at {self.address} refused our signature (is FLEET_PEER_SECRET the "
                            "same on every node?)", "refused")
        return status == 200

    def _wait(self, began: float, got: int) -> float:
        """How long the next read may block: the read timeout, or less when the rate floor is due sooner."""
        if self.min_rate is None:
            return self.timeout
        due = began + RATE_GRACE + got / self.min_rate - time.monotonic()
        if due <= 0:
            raise TimeoutError("rate floor")
        return min(self.timeout, max(0.01, due))

    def read(self, sha256: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob the peer holds."""
        path, byte_range, want = f"/blobs/{sha256}", f"bytes={start}-{end - 1}", end - start
        began = time.monotonic()
        got = 0
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._wait(began, 0))
        try:
            conn.request("GET", path, headers=self._headers("GET", path, byte_range))
            conn.sock.settimeout(self._wait(began, 0))
            response = conn.getresponse()
            if response.status != 206:
                raise PeerError(f"peer {self.node} at {self.address}: HTTP {response.status} for {want} bytes")
            body = bytearray()
            while got < want:
                conn.sock.settimeout(self._wait(began, got))
                data = response.read1(min(READ_CHUNK, want - got))
                if not data:
                    raise PeerError(f"peer {self.node} at {self.address}: {got} of {want} bytes, then the end")
                body += data
                got += len(data)
            return bytes(body)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, PeerError):
                raise
            elapsed = time.monotonic() - began
            if self.min_rate is not None and isinstance(exc, TimeoutError) and \
                    elapsed >= RATE_GRACE + got / self.min_rate - 0.02:
                raise PeerError(f"peer {self.node} at {self.address}: {got} of {want} bytes in {elapsed:.2f} s, "
                                f"under the floor of {self.min_rate * 8 / 1e6:g} Mbit/s", "slow") from exc
            raise self._fail(exc) from exc
        finally:
            conn.close()
