"""A small server speaking Alibaba OSS's REST dialect on loopback, so oss2 itself runs in tests and benches.

No installable server speaks OSS well enough (listing, multipart, batch delete, copy and the OSS headers all
differ from S3 in ways oss2 notices), hence this one. Storage is a plain directory.
"""

from .errors import OssError
from .link import Link
from .server import OssServer, RequestRecord

__all__ = ["Link", "OssError", "OssServer", "RequestRecord"]
