"""Storage failures: one exception with a stable `kind`, and the translation of whatever
fsspec, s3fs, botocore or the OS raised into it.

Every failure the caller can act on is a `StorageError` with a stable `kind` (`KINDS`) and a
message that names the URI and the reason. Messages never hold a secret: they are built from
the server's error code and text, and any secret value the storage configuration knows is
scrubbed out. Only kind `unavailable` is retryable (connection refused/reset, timeouts, HTTP
5xx, throttling); not_found, access_denied, no_credentials and bucket_missing are final.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from pipelines.errors import PipelineError
from pipelines.storage.uri import redact_uri

RETRYABLE_KINDS = frozenset({"unavailable"})


class StorageError(PipelineError):
    """A storage failure with a stable, machine-readable ``kind`` and a message naming the URI."""

    KINDS = ("not_found", "access_denied", "no_credentials", "bucket_missing", "vanished",
             "bad_manifest", "unavailable", "io_error")
    kind = "io_error"

    def __init__(self, uri: str, reason: str, kind: str | None = None, attempts: int = 1):
        if kind is not None:
            self.kind = kind
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown StorageError kind {self.kind!r}")
        self.uri = redact_uri(uri)
        self.reason = reason
        self.attempts = attempts  # requests made, retries included
        super().__init__(f"{self.kind}: {self.uri}: {reason}")

    def __reduce__(self):  # keeps kind and attempts across Ray's pickling
        return (_rebuild_error, (type(self), self.uri, self.reason, self.kind, self.attempts))

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS


def _rebuild_error(cls, uri, reason, kind, attempts):
    return cls(uri, reason, kind, attempts)


class ObjectVanishedError(StorageError):
    """An object that was listed (or named in a manifest) is gone when it is read."""

    kind = "vanished"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# -- error translation -----------------------------------------------------------------------

_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidToken",
                 "ExpiredToken", "AccountProblem", "InvalidObjectState"}
_BAD_KEY_CODES = {"SignatureDoesNotMatch": "the secret key does not match the access key",
                  "InvalidAccessKeyId": "the access key id is unknown to the server"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_UNAVAILABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                      "TooManyRequests", "429", "RequestTimeout", "ServiceUnavailable",
                      "InternalError", "500", "502", "503", "504"}
# transport failures, by class name (botocore, aiohttp, fsspec, http.client; no imports needed)
_UNAVAILABLE_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                       "ConnectionClosedError", "ProxyConnectionError", "ClientConnectorError",
                       "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
                       "ClientPayloadError", "FSTimeoutError", "IncompleteRead",
                       "ResponseParserError"}


def _chain(exc: BaseException | None, limit: int = 6) -> Iterator[BaseException]:
    while exc is not None and limit > 0:
        yield exc
        exc = exc.__cause__ or exc.__context__
        limit -= 1


def client_error(exc: BaseException):
    """The botocore ClientError behind an s3fs exception, if any: (code, message, status)."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, Mapping) and "Error" in response:
            err = response["Error"]
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return str(err.get("Code", "")), str(err.get("Message", "")), status
    return None


def _transport_failure(exc: BaseException) -> BaseException | None:
    """The connection-level failure (refused, reset, timed out) behind ``exc``, if any."""
    for link in _chain(exc):
        if type(link).__name__ in _UNAVAILABLE_ERRORS or isinstance(
                link, (ConnectionError, TimeoutError)):
            return link
    return None


def storage_error(exc: BaseException, uri: str, storage=None,
                  action: str = "access") -> StorageError:
    """Translate any exception from fsspec/s3fs/botocore/the OS into a `StorageError` naming
    `uri`; `storage` (a StorageConfig or s3fs options) names the secrets to scrub."""
    from pipelines.storage.config import StorageConfig

    if isinstance(exc, StorageError):
        return exc
    kind, reason = _classify(exc, action)
    return StorageError(uri, _scrub(reason, StorageConfig.coerce(storage).secrets()), kind)


def _classify(exc: BaseException, action: str) -> tuple[str, str]:
    """(kind, reason) of a backend exception."""
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return "no_credentials", ("no S3 credentials: pass key/secret in storage_options or set "
                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    detail = client_error(exc)
    if detail is not None:
        return _classify_response(*detail, action)
    transport = _transport_failure(exc)
    if transport is not None:
        return "unavailable", (f"store unavailable for {action} "
                               f"({type(transport).__name__}: {transport})")
    if isinstance(exc, FileNotFoundError):
        return "not_found", "not found"
    if isinstance(exc, PermissionError):
        return "access_denied", f"access denied for {action} ({exc})"
    return "io_error", f"{action} failed ({name}: {exc})"


def _classify_response(code: str, message: str, status, action: str) -> tuple[str, str]:
    """(kind, reason) of an error response of the S3 API."""
    if code == "NoSuchBucket":
        return "bucket_missing", f"bucket does not exist ({code})"
    if code in _BAD_KEY_CODES:
        return "access_denied", f"{_BAD_KEY_CODES[code]} ({code})"
    if code in _DENIED_CODES:
        return "access_denied", f"access denied for {action} ({code}: {message})"
    if code in _NOT_FOUND_CODES:
        return "not_found", f"not found ({code}: {message})"
    if code in _UNAVAILABLE_CODES or (isinstance(status, int) and status >= 500):
        return "unavailable", f"store unavailable for {action} ({code or status}: {message})"
    return "io_error", f"{action} failed ({code}: {message})"


@contextmanager
def translated(uri: str, storage, action: str):
    """Re-raise whatever the backend throws as a ``StorageError``."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every backend error becomes a StorageError
        raise storage_error(exc, uri, storage, action) from None

