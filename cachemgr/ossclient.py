"""How an oss2 client is built, once: credentials (plain keys, an STS token, or anonymous), addressing style, and
the HTTP(S) proxy its requests may go through (a site's caching proxy, or a P2P engine's daemon such as Dragonfly's
dfdaemon)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import oss2


def is_ip_or_localhost(endpoint: str) -> bool:
    """oss2 builds virtual-host URLs unless told otherwise; an IP or localhost endpoint needs path style."""
    netloc = urlparse(endpoint if "://" in endpoint else "http://" + endpoint).netloc
    return bool(netloc) and oss2.utils.is_ip_or_localhost(netloc)


def oss_auth(access_key_id: str | None, access_key_secret: str | None, security_token: str | None) -> Any:
    """STS credentials when a token is given, plain keys otherwise, anonymous access with neither."""
    if security_token:
        return oss2.StsAuth(access_key_id or "", access_key_secret or "", security_token)
    if access_key_id:
        return oss2.Auth(access_key_id, access_key_secret or "")
    return oss2.AnonymousAuth()


def check_proxy(proxy: str) -> str:
    """A proxy URL requests can use: http:// or https://, a host, an optional port, nothing else."""
    parsed = urlparse(proxy)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/") \
            or parsed.query or parsed.fragment:
        raise ValueError(f"invalid proxy {proxy!r}: expected http://host:port (or https://host:port)")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"invalid proxy {proxy!r}: its port is not a number") from None
    return proxy


def oss_bucket(bucket: str, endpoint: str, *, access_key_id: str | None = None, access_key_secret: str | None = None,
               security_token: str | None = None, connect_timeout: float = 10.0, pool_size: int | None = None,
               is_path_style: bool | None = None, proxy: str | None = None) -> oss2.Bucket:
    """`proxy` (http://host:port): every request of this client goes through it, whatever the environment says."""
    if is_path_style is None:
        is_path_style = is_ip_or_localhost(endpoint)
    session = oss2.Session(pool_size=pool_size) if pool_size else None
    proxies = {"http": check_proxy(proxy), "https": proxy} if proxy else None
    return oss2.Bucket(oss_auth(access_key_id, access_key_secret, security_token), endpoint, bucket, session=session,
                       connect_timeout=connect_timeout, app_name="warmfleet", is_path_style=is_path_style,
                       proxies=proxies)
