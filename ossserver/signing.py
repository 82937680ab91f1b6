"""OSS signature V1, checked the way the service checks it: HMAC-SHA1 over the canonical request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from .errors import OssError

SUBRESOURCES = frozenset(
    """acl uploads location cors logging website referer lifecycle delete append tagging objectMeta uploadId
    partNumber security-token position style styleName replication replicationProgress replicationLocation
    cname bucketInfo comp qos live status vod startTime endTime symlink x-oss-process response-content-type
    response-content-language response-expires response-cache-control response-content-disposition
    response-content-encoding restore
    callback callback-var qosInfo policy stat encryption versions versioning versionId requestPayment
    x-oss-request-payer sequential inventory inventoryId continuation-token asyncFetch worm wormId wormExtend
    link group objectInfo transferAcceleration metaQuery x-oss-traffic-limit resourceGroup
    regionList accessPoint accessPointPolicy publicAccessBlock requesterQosInfo qosRequester resourcePool
    resourcePoolInfo resourcePoolBuckets x-oss-ac-source-ip x-oss-ac-subnet-mask x-oss-ac-vpc-id
    x-oss-ac-forward-allow x-oss-async-process bucketArchiveDirectRead httpsConfig redundancyTransition
    x-oss-target-redundancy-type x-oss-redundancy-transition-taskid x-oss-write-get-object-response
    x-oss-access-point-name""".split()
)
"""Query parameters that are part of the signed resource (the list oss2 2.19 signs); others are not signed."""

MAX_SKEW_S = 15 * 60


@dataclass(frozen=True)
class Credential:
    secret: str
    security_token: str | None = None


def canonical_resource(bucket: str | None, key: str, params: Mapping[str, str]) -> str:
    base = "/" if not bucket else f"/{bucket}/{key}"
    subs = sorted((k, v) for k, v in params.items() if k in SUBRESOURCES)
    if not subs:
        return base
    return base + "?" + "&".join(f"{k}={v}" if v else k for k, v in subs)


def string_to_sign(method: str, headers: Mapping[str, str], date: str, resource: str) -> str:
    """VERB, Content-MD5, Content-Type, Date, then the sorted `x-oss-*` headers, then the resource."""
    oss_headers = sorted((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-oss-"))
    canon = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    return "\n".join(
        [method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), date, canon + resource]
    )


def sign(secret: str, text: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), text.encode(), hashlib.sha1).digest()).decode()


def check_request(
    credentials: Mapping[str, Credential],
    method: str,
    headers: Mapping[str, str],
    params: Mapping[str, str],
    bucket: str | None,
    key: str,
    now: float | None = None,
) -> None:
    """Raise the OssError the service would answer, or return if the request is signed by a known key.

    Covers header signatures (`Authorization: OSS id:sig`) and presigned URLs (`OSSAccessKeyId`, `Expires`,
    `Signature` in the query). `headers` must look up case-insensitively.
    """
    now = time.time() if now is None else now
    auth = headers.get("Authorization")
    if auth:
        scheme, _, rest = auth.partition(" ")
        key_id, _, signature = rest.partition(":")
        if scheme != "OSS" or not key_id or not signature:
            raise OssError("InvalidArgument", "Authorization header is invalid; expected 'OSS <AccessKeyId>:<Signature>'.")
        date = headers.get("x-oss-date") or headers.get("Date") or ""
        try:
            skew = abs(parsedate_to_datetime(date).timestamp() - now)
        except (TypeError, ValueError):
            raise OssError("AccessDenied", "Invalid or missing Date header.") from None
        if skew > MAX_SKEW_S:
            raise OssError("RequestTimeTooSkewed", RequestTime=date, ServerTime=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now)))
        token = headers.get("x-oss-security-token")
    elif "Signature" in params:
        key_id, signature, date = params.get("OSSAccessKeyId", ""), params["Signature"], params.get("Expires", "")
        if not date.isdigit():
            raise OssError("AccessDenied", "Expires must be a number of seconds since the epoch.")
        if int(date) < now:
            raise OssError("AccessDenied", "Request has expired.", Expires=date)
        token = params.get("security-token")
    else:
        raise OssError("AccessDenied", "AccessDenied: anonymous access is forbidden for this operation.")
    credential = credentials.get(key_id)
    if credential is None:
        raise OssError("InvalidAccessKeyId", OSSAccessKeyId=key_id)
    if credential.security_token is not None and token != credential.security_token:
        raise OssError("InvalidSecurityToken", OSSAccessKeyId=key_id)
    text = string_to_sign(method, headers, date, canonical_resource(bucket, key, params))
    if not hmac.compare_digest(sign(credential.secret, text), signature):
        raise OssError("SignatureDoesNotMatch", StringToSign=text, OSSAccessKeyId=key_id)
