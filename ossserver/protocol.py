"""What the handler and its operations share: the parsed request, limits, query parameters and byte ranges."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from .errors import OssError

CHUNK = 1 << 20
MAX_XML_BODY = 4 << 20
MAX_KEY_BYTES = 1023
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


@dataclass
class Request:
    method: str
    bucket: str | None
    key: str
    params: dict[str, str]


def _token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode()


def _untoken(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise OssError("InvalidArgument", "The continuation token is not valid.") from None


def _int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name) or ""
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise OssError("InvalidArgument", f"{name} must be an integer between {low} and {high}.",
                       ArgumentName=name, ArgumentValue=raw)
    return int(raw)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a satisfiable single `bytes=` range, or None when absent or unusable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or start > end:
        return None
    return start, min(end, size - 1)
