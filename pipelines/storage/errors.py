"""Storage errors: what failed, in words safe to print, and whether trying again can help.

`describe_error` turns boto3/pyarrow/OS exceptions into one StorageError line (never a
secret); `TransientStorageError` marks the ones worth retrying (unreachable, 5xx,
throttled, timed out), and `with_retries` retries those with exponential backoff.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

_log = logging.getLogger(__name__)

# Error codes S3 answers when the caller's identity is the problem, not the object.
_CREDENTIAL_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}


class StorageError(Exception):
    """A location could not be used. The message is safe to print (it holds no secret)."""


class NotFoundError(StorageError):
    """The object, file or bucket does not exist."""


class TransientStorageError(StorageError):
    """The store could not answer now (unreachable, 5xx, throttled, timed out): worth retrying."""


# S3 error codes that say "try again later", not "this request is wrong".
_TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestTimeout", "RequestLimitExceeded", "TooManyRequestsException",
}
# Fragments of pyarrow/AWS SDK error texts for the same conditions (pyarrow raises OSError).
_TRANSIENT_TEXT = re.compile(
    r"NETWORK_CONNECTION|Connection refused|connect|timed out|timeout|SLOW_DOWN|SERVICE_UNAVAILABLE|"
    r"INTERNAL_FAILURE|THROTTLING|curlCode|Broken pipe|reset by peer|HTTP response code: 5\d\d",
    re.IGNORECASE,
)


def is_transient(exc: BaseException) -> bool:
    """Would the same request likely succeed a little later?"""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, StorageError):
        return False
    return isinstance(describe_error(exc, "request"), TransientStorageError)


def with_retries(action: Callable[[], Any], *, attempts: int, what: str, base_delay: float = 1.0,
                 max_delay: float = 16.0, sleep: Callable[[float], None] | None = None) -> Any:
    """Run `action`; on a transient error wait (1, 2, 4, ... s, capped) and try again, up to
    `attempts` tries in all. Permanent errors, and the last transient one, are raised."""
    import time

    pause = sleep or time.sleep
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            _log.warning("%s: transient error (%s), retry %d of %d in %.1f s",
                         what, str(describe_error(exc, what))[:200], attempt, attempts - 1, delay)
            pause(delay)
    raise AssertionError("unreachable")


def describe_error(exc: BaseException, what: str) -> StorageError:
    """Turn boto3/pyarrow/OS errors into one line that says what to fix (never a secret)."""
    import botocore.exceptions as bx

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bx.NoCredentialsError):
        return StorageError(
            f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment"
        )
    if isinstance(exc, bx.EndpointConnectionError):
        return TransientStorageError(
            f"{what}: cannot connect to the S3 endpoint; check storage.endpoint_url / AWS_ENDPOINT_URL")
    if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):  # timeouts, resets, closed connections
        return TransientStorageError(f"{what}: connection to the S3 endpoint failed ({type(exc).__name__})")
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _TRANSIENT_CODES or status.startswith("5"):
            return TransientStorageError(f"{what}: S3 is unavailable or throttling ({code}); retry later")
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"{what}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_PROFILE for this endpoint"
            )
        if code in {"AccessDenied", "403", "Forbidden"}:
            return StorageError(f"{what}: access denied ({code}); these credentials lack permission here")
        if code in {"NoSuchBucket"}:
            return NotFoundError(f"{what}: the bucket does not exist")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return NotFoundError(f"{what}: not found")
        return StorageError(f"{what}: S3 error {code}")
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{what}: not found")
    if isinstance(exc, PermissionError):
        return StorageError(f"{what}: permission denied")
    # pyarrow and OS errors carry no credentials in their text; keep the first line.
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (ConnectionError, TimeoutError)) or (
        isinstance(exc, OSError) and _TRANSIENT_TEXT.search(str(exc))
    ):
        return TransientStorageError(f"{what}: {first}")
    return StorageError(f"{what}: {first}")


