"""`OssServer`: the OSS-protocol test server as an object a test (or `python -m ossserver`) can run."""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from .errors import OssError
from .handler import OssHandler
from .link import Link
from .protocol import Request
from .signing import Credential
from .storage import Storage


@dataclass(frozen=True)
class RequestRecord:
    """What a test can assert about traffic: which objects were read, and which byte ranges."""

    method: str
    bucket: str | None
    key: str
    params: dict[str, str]
    range: str | None


@dataclass
class _Cut:
    offset: int
    times: int | None


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], oss: OssServer) -> None:
        self.oss = oss
        super().__init__(address, OssHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client hanging up (or `stop()` closing keep-alive connections) is not worth a traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


class OssServer:
    """A loopback server speaking the OSS REST dialect well enough for oss2 to run unmodified against it.

    Without keys every request is accepted; with keys, requests must carry a valid V1 signature (or a presigned
    URL) and, when `security_token` is set, the matching `x-oss-security-token`. `requests` records every
    request for tests to assert on (turn it off with `log_requests=False` for a long-running process). `link`
    emulates a slow line (see `ossserver.link`), so a benchmark can run "100 Mbps, 45 ms" on loopback.
    """

    def __init__(
        self,
        root_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        access_key_id: str | None = None,
        access_key_secret: str | None = None,
        security_token: str | None = None,
        log_requests: bool = True,
        link: Link | None = None,
    ) -> None:
        self.storage = Storage(root_dir)
        self.link = link or Link()
        """The emulated line to every client (a shared bandwidth cap, a delay per request); unlimited by default."""
        self.log_requests = log_requests
        self.host = host
        self.port = port
        self.credentials: dict[str, Credential] = {}
        if access_key_id:
            self.add_credentials(access_key_id, access_key_secret or "", security_token)
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._failures: list[str] = []
        self._connections: set[socket.socket] = set()
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> OssServer:
        self._http = _HttpServer((self.host, self.port), self)
        self.port = self._http.server_address[1]
        http = self._http
        self._thread = threading.Thread(
            target=lambda: http.serve_forever(poll_interval=0.05), name=f"oss-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is None:
            return
        if self._thread is not None:
            self._http.shutdown()
        self._http.server_close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http = self._thread = None

    def __enter__(self) -> OssServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- setup helpers
    def add_credentials(self, access_key_id: str, access_key_secret: str, security_token: str | None = None) -> None:
        self.credentials[access_key_id] = Credential(access_key_secret, security_token)

    def create_bucket(self, name: str) -> None:
        try:
            self.storage.create_bucket(name)
        except OssError as exc:
            if exc.code != "BucketAlreadyExists":
                raise

    # -- fault injection
    def corrupt(self, bucket: str, key: str, offset: int | None = None, nbytes: int = 1) -> None:
        """Flip bytes of a stored object in place, leaving its ETag and CRC64 as they were (bit rot on disk)."""
        store = self.storage.bucket(bucket)
        meta = store.head(key)
        if meta.size == 0:
            raise ValueError(f"{bucket}/{key} is empty; nothing to corrupt")
        offset = meta.size // 2 if offset is None else offset
        with open(store.data_path(meta), "r+b") as fh:
            fh.seek(offset)
            data = fh.read(nbytes)
            fh.seek(offset)
            fh.write(bytes(b ^ 0xFF for b in data))

    def drop_after(self, bucket: str, key: str, offset: int, times: int | None = None) -> None:
        """Cut the connection of GETs of this object once they reach byte `offset` of the object.

        Ranges that end before `offset` are served whole. `times` limits how many responses are cut
        (None: until `clear_faults()`).
        """
        with self._lock:
            self._cuts[(bucket, key)] = _Cut(offset, times)

    def fail_next(self, count: int, code: str = "ServiceUnavailable") -> None:
        """Answer the next `count` requests with an OSS error (503 ServiceUnavailable by default)."""
        with self._lock:
            self._failures.extend([code] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._cuts.clear()
            self._failures.clear()

    # -- called by the handler
    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _before(self, req: Request, byte_range: str | None) -> None:
        with self._lock:
            if self.log_requests:
                self.requests.append(RequestRecord(req.method, req.bucket, req.key, dict(req.params), byte_range))
            if self._failures:
                raise OssError(self._failures.pop(0))

    def _cut_at(self, bucket: str, key: str, start: int, length: int) -> int | None:
        with self._lock:
            cut = self._cuts.get((bucket, key))
            if cut is None or start + length <= cut.offset:
                return None
            if cut.times is not None:
                cut.times -= 1
                if cut.times <= 0:
                    del self._cuts[(bucket, key)]
            return cut.offset
