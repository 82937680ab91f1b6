"""Images in an OSS prefix, so producers on other machines can fetch them: results carry the object key."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import oss2

from cachemgr.ossclient import oss_bucket

from . import OutputStore, validate_key


class OssOutputStore(OutputStore):
    def __init__(self, bucket: str, prefix: str, *, endpoint: str, access_key_id: str | None = None,
                 access_key_secret: str | None = None, security_token: str | None = None,
                 connect_timeout: float = 10.0, **_: Any) -> None:
        if not endpoint:
            raise ValueError("an oss:// output store needs FLEET_OSS_ENDPOINT")
        self.bucket = oss_bucket(bucket, endpoint, access_key_id=access_key_id, access_key_secret=access_key_secret,
                                 security_token=security_token, connect_timeout=connect_timeout)
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"oss://{bucket}/{self.prefix}" if self.prefix else f"oss://{bucket}"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> OssOutputStore:
        parsed = urlparse(url)
        return cls(parsed.netloc, parsed.path, **options)

    def key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        """One PUT: the object appears whole or not at all, and a redelivered job overwrites the same key."""
        self.bucket.put_object(self.key(key), data, headers={"Content-Type": content_type})
        return f"oss://{self.bucket_name}/{self.key(key)}"

    def get(self, key: str) -> bytes:
        return self.bucket.get_object(self.key(key)).read()

    def exists(self, key: str) -> bool:
        return self.bucket.object_exists(self.key(key))

    def keys(self) -> list[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        return sorted(o.key[len(prefix):] for o in oss2.ObjectIteratorV2(self.bucket, prefix=prefix))
