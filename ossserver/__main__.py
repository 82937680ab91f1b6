"""`python -m ossserver --root DIR --port N`: run the OSS test server as a process.

The first line on stdout is the endpoint, printed once the socket listens, so a parent can wait for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .link import Link, parse_rate
from .server import OssServer

SECRET_ENV = "OSS_SERVER_ACCESS_KEY_SECRET"
RATE_ENV = "OSS_SERVER_LINK_RATE"
DELAY_ENV = "OSS_SERVER_LINK_DELAY_MS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ossserver", description=__doc__)
    parser.add_argument("--root", required=True, help="directory holding the buckets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--access-key-id")
    parser.add_argument("--access-key-secret", default=os.environ.get(SECRET_ENV),
                        help=f"the key's secret (or set {SECRET_ENV}, which keeps it out of the process list)")
    parser.add_argument("--security-token", help="require this STS token with the key")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--link-rate", default=os.environ.get(RATE_ENV),
                        help=f"emulate a line of this rate shared by all clients, e.g. 100mbit (or set {RATE_ENV})")
    parser.add_argument("--link-delay-ms", type=float, default=float(os.environ.get(DELAY_ENV) or 0),
                        help=f"add this delay to every request, e.g. 45 for a 45 ms round trip (or set {DELAY_ENV})")
    args = parser.parse_args(argv)
    try:
        link = Link(parse_rate(args.link_rate) if args.link_rate else None, args.link_delay_ms)
    except ValueError as exc:
        parser.error(str(exc))
    if bool(args.access_key_id) != bool(args.access_key_secret):
        parser.error("--access-key-id and --access-key-secret go together")

    server = OssServer(
        args.root, args.host, args.port, args.access_key_id, args.access_key_secret, args.security_token,
        log_requests=False, link=link,
    )
    for name in args.bucket:
        server.create_bucket(name)
    server.start()
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print(server.endpoint, flush=True)
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
