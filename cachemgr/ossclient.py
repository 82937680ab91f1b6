"""How an oss2 client is built, once: credentials (plain keys, an STS token, or anonymous) and addressing style."""

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


def oss_bucket(bucket: str, endpoint: str, *, access_key_id: str | None = None, access_key_secret: str | None = None,
               security_token: str | None = None, connect_timeout: float = 10.0, pool_size: int | None = None,
               is_path_style: bool | None = None) -> oss2.Bucket:
    if is_path_style is None:
        is_path_style = is_ip_or_localhost(endpoint)
    session = oss2.Session(pool_size=pool_size) if pool_size else None
    return oss2.Bucket(oss_auth(access_key_id, access_key_secret, security_token), endpoint, bucket, session=session,
                       connect_timeout=connect_timeout, app_name="warmfleet", is_path_style=is_path_style)
