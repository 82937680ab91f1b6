"""OSS error codes with the status and message the real service answers, so oss2 raises the same exceptions."""

from __future__ import annotations

ERRORS: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "You have no right to access this object because of bucket acl."),
    "BucketAlreadyExists": (409, "The requested bucket name is not available."),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty."),
    "EntityTooSmall": (400, "Your proposed upload smaller than the minimum allowed size."),
    "FileAlreadyExists": (409, "The object you specified already exists and can not be overwritten."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InvalidAccessKeyId": (403, "The OSS Access Key Id you provided does not exist in our records."),
    "InvalidArgument": (400, "Invalid argument."),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "InvalidObjectName": (400, "The Length of Object name must be less than 1024."),
    "InvalidPart": (400, "One or more of the specified parts could not be found or the specified entity tag might not have matched the part's entity tag."),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order. Parts list must be specified in order by part number."),
    "InvalidRange": (416, "The requested range cannot be satisfied."),
    "InvalidRequest": (400, "Invalid request."),
    "InvalidSecurityToken": (403, "The security token you provided is invalid."),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate against our published schema."),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "NoSuchBucket": (404, "The specified bucket does not exist."),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (404, "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."),
    "NotImplemented": (501, "This operation is not implemented by the warmfleet OSS test server."),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold."),
    "RequestTimeTooSkewed": (403, "The difference between the request time and the current time is too large."),
    "ServiceUnavailable": (503, "Please reduce your request rate."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you provided. Check your key and signing method."),
}


class OssError(Exception):
    """An error answered as OSS does: a status, a Code, a Message, and extra fields for the error XML."""

    def __init__(self, code: str, message: str | None = None, status: int | None = None, **extra: str) -> None:
        default_status, default_message = ERRORS.get(code, (400, code))
        self.code = code
        self.status = status or default_status
        self.message = message or default_message
        self.extra = extra
        super().__init__(f"{self.status} {code}: {self.message}")
