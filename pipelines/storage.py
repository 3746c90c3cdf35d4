"""The storage layer: where audio comes from and where labels go, over fsspec (s3fs for S3).

Contract:
  * A location is a URI: ``s3://bucket/key``, any other fsspec URI (``memory://``, ``gs://``...),
    or a local path. ``resolve`` turns it into ``(filesystem, path)``.
  * S3 settings come from explicit ``storage_options`` (s3fs keyword arguments; ``endpoint_url``
    may sit at top level or in ``client_kwargs``) and otherwise from the standard variables
    ``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``. Values read from the
    environment are passed to s3fs explicitly, so fsspec's instance cache is keyed on them.
  * Listings stream: ``list_objects`` yields while it walks (one S3 page, or one local folder, in
    memory at a time), so a bucket of millions of objects never becomes a list.
  * ``ObjectInfo.etag`` is the S3 ETag (quotes stripped). Local files have no ETag; they get the
    cheap fingerprint ``"<mtime_ns hex>-<size hex>"``: it changes on any rewrite that changes size
    or mtime (mtime resolution is the kernel tick, a few ms, so a same-size rewrite in one tick
    keeps the fingerprint), and survives moves within a filesystem.
  * Every failure the caller can act on is a ``StorageError`` with a stable ``kind`` (see
    ``StorageError.KINDS``) and a message that names the URI and the reason. Messages never hold
    a secret: they are built from the server's error code and text, and any secret value known
    from the options is scrubbed out. Use ``safe_options`` for anything logged or written.
  * Retries are ours, in one place: ``retrying`` runs an operation under a ``RetryPolicy``
    (bounded attempts and total time, exponential backoff with jitter). Only kind
    ``unavailable`` is retried (connection refused/reset, timeouts, HTTP 5xx, throttling);
    not_found, access_denied, no_credentials and bucket_missing fail on the first answer.
    botocore is told to try once (``config_kwargs`` may override that), so retries never nest.
    Listings retry page by page, reads and the preflight checks as a whole; callers wrap their
    own filesystem calls (the job's plan and shard writes) in ``retrying`` with the job's policy.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

AUDIO_EXTENSIONS = frozenset({"wav", "flac", "ogg", "opus", "mp3"})  # what soundfile decodes
MANIFEST_URI_COLUMNS = ("uri", "source_uri", "path")
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
                    ".jsonl": "jsonl", ".ndjson": "jsonl"}
LIST_PAGE_SIZE = 1000
PROBE_PREFIX = ".kimi-label-write-probe-"

_S3_PROTOCOLS = ("s3", "s3a")
_ACCESS_KEY_NAMES = {"key", "access_key", "access_key_id", "aws_access_key_id", "accesskey"}
_SECRET_MARKERS = ("secret", "token", "password", "key", "credential")


# -- errors ----------------------------------------------------------------------------------

class StorageError(Exception):
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


# -- secrets ---------------------------------------------------------------------------------

def redact(value: Any, keep: int = 0) -> str:
    """``value`` as a masked string; ``keep`` leading characters stay visible (only for ids)."""
    text = "" if value is None else str(value)
    if not text:
        return ""
    keep = min(keep, len(text) // 3)  # never reveal most of a short value
    return text[:keep] + "***"


def redact_uri(uri: str) -> str:
    """Hide a password embedded in a URI (``s3://KEY:SECRET@bucket/...``)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{redact(user, keep=4)}:***@{host}"


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def safe_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A copy fit for logs and reports: secret-like values masked, access key ids shortened."""
    if storage_options is None:
        return None
    safe: dict[str, Any] = {}
    for name, value in storage_options.items():
        if isinstance(value, Mapping):
            safe[name] = safe_options(value)
        elif name.lower() in _ACCESS_KEY_NAMES:
            safe[name] = redact(value, keep=4)
        elif _is_secret_name(name):
            safe[name] = redact(value)
        elif isinstance(value, str):
            safe[name] = redact_uri(value)
        else:
            safe[name] = value
    return safe


def _secret_values(options: Mapping[str, Any] | None) -> list[str]:
    found = []
    for name, value in (options or {}).items():
        if isinstance(value, Mapping):
            found += _secret_values(value)
        elif isinstance(value, str) and value and _is_secret_name(name) \
                and name.lower() not in _ACCESS_KEY_NAMES:
            found.append(value)
    return found


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# -- resolving -------------------------------------------------------------------------------

def _protocol(uri: str) -> str:
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep else "file"


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def s3_options(storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """s3fs keyword arguments: explicit options first, the AWS_* variables for what is missing."""
    opts = dict(storage_options or {})
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = (opts.pop("endpoint_url", None) or client_kwargs.get("endpoint_url")
                or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    region = (client_kwargs.get("region_name") or opts.pop("region", None)
              or _env("AWS_DEFAULT_REGION", "AWS_REGION"))
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        region = region or "us-east-1"  # a custom endpoint still needs a signing region
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    explicit_auth = opts.get("anon") or "key" in opts or "profile" in opts or "session" in opts
    if not explicit_auth:
        key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            opts["key"], opts["secret"] = key, secret
            token = _env("AWS_SESSION_TOKEN")
            if token:
                opts["token"] = token
    return opts


def options_for_workers(uris: Sequence[str],
                        storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The options to hand to processes on other machines: with an S3 URI among `uris` (or a
    manifest, whose entries may be), `s3_options` as this process resolves them, so workers of a
    running cluster, whose environment is not this one's, reach the same endpoint with the same
    credentials. They travel in memory with the stages, as a credentials block's values do;
    reports show `safe_options`. Other URIs: the options as given."""
    if not any(_protocol(u) in _S3_PROTOCOLS or is_manifest(u) for u in uris):
        return dict(storage_options) if storage_options is not None else None
    return s3_options(storage_options)


def resolve(uri: str, storage_options: Mapping[str, Any] | None = None):
    """``(filesystem, path)`` for an ``s3://`` URI, any fsspec URI, or a local path.

    The path has no protocol and no trailing slash; join children with ``f"{path}/name"``.
    """
    import fsspec

    protocol = _protocol(uri)
    if protocol in _S3_PROTOCOLS:
        import s3fs

        # no listings cache: other processes (Ray workers, other runs) write under the same
        # prefixes, and a stale listing would make `info` report new objects as missing
        opts = {"use_listings_cache": False, **s3_options(storage_options)}
        # botocore tries once: `retrying` owns retries (no nested backoff, no retry storm)
        opts["config_kwargs"] = {"retries": {"total_max_attempts": 1},
                                 **(opts.get("config_kwargs") or {})}
        fs = s3fs.S3FileSystem(**opts)
        return fs, fs._strip_protocol(uri).rstrip("/")
    if protocol == "file":
        fs = fsspec.filesystem("file")  # options are for the remote side of the job
        local = uri.split("://", 1)[1] if "://" in uri else uri
        return fs, os.path.abspath(os.path.expanduser(local))
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def _is_s3(fs) -> bool:
    return any(p in _S3_PROTOCOLS for p in _protocols(fs))


def is_local(fs) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def uri_of(fs, path: str) -> str:
    """The URI of a path on ``fs`` as ``resolve`` returned it (for messages)."""
    return _uri(fs, path)


def _uri(fs, path: str) -> str:
    if is_local(fs):
        return path
    if _is_s3(fs):
        return f"s3://{path}"
    return fs.unstrip_protocol(path)


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


def _client_error(exc: BaseException):
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


def storage_error(exc: BaseException, uri: str,
                  storage_options: Mapping[str, Any] | None = None,
                  action: str = "access") -> StorageError:
    """Translate any exception from fsspec/s3fs/botocore into a ``StorageError``."""
    if isinstance(exc, StorageError):
        return exc
    secrets = _secret_values(s3_options(storage_options)) + _secret_values(storage_options)
    name = type(exc).__name__
    detail = _client_error(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        kind = "no_credentials"
        reason = ("no S3 credentials: pass key/secret in storage_options or set "
                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    elif detail is not None:
        code, message, status = detail
        if code == "NoSuchBucket":
            kind, reason = "bucket_missing", f"bucket does not exist ({code})"
        elif code in _BAD_KEY_CODES:
            kind, reason = "access_denied", f"{_BAD_KEY_CODES[code]} ({code})"
        elif code in _DENIED_CODES:
            kind, reason = "access_denied", f"access denied for {action} ({code}: {message})"
        elif code in _NOT_FOUND_CODES:
            kind, reason = "not_found", f"not found ({code}: {message})"
        elif code in _UNAVAILABLE_CODES or (isinstance(status, int) and status >= 500):
            kind = "unavailable"
            reason = f"store unavailable for {action} ({code or status}: {message})"
        else:
            kind, reason = "io_error", f"{action} failed ({code}: {message})"
    elif (transport := _transport_failure(exc)) is not None:
        kind = "unavailable"
        reason = f"store unavailable for {action} ({type(transport).__name__}: {transport})"
    elif isinstance(exc, FileNotFoundError):
        kind, reason = "not_found", "not found"
    elif isinstance(exc, PermissionError):
        kind, reason = "access_denied", f"access denied for {action} ({exc})"
    elif isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        kind, reason = "io_error", f"{action} failed ({name}: {exc})"
    else:
        kind, reason = "io_error", f"{action} failed ({name}: {exc})"
    return StorageError(uri, _scrub(reason, secrets), kind)


@contextmanager
def _translated(uri: str, storage_options, action: str):
    """Re-raise whatever the backend throws as a ``StorageError``."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every backend error becomes a StorageError
        raise storage_error(exc, uri, storage_options, action) from None


# -- retries ---------------------------------------------------------------------------------

RETRYABLE_KINDS = frozenset({"unavailable"})


@dataclass(frozen=True)
class RetryPolicy:
    """How long a storage operation keeps trying while the store is unavailable.

    Attempt ``n`` (from 1) that fails with a retryable error waits ``d/2 + uniform(0, d/2)``
    with ``d = min(max_delay_s, base_delay_s * 2**(n-1))``, then tries again, until
    ``attempts`` tries were made or the next try would start more than ``budget_s`` after the
    first. Then it raises ``StorageError`` of kind ``unavailable`` saying so. Defaults ride out
    a store restart of about a minute.
    """

    attempts: int = 12
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    budget_s: float = 90.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.base_delay_s, self.max_delay_s, self.budget_s) < 0:
            raise ValueError("delays and budget must not be negative")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The pause after failed attempt ``attempt`` (1-based): exponential, half jittered."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


DEFAULT_RETRY = RetryPolicy()


def retrying(call: Callable[[], T], uri: str, storage_options: Mapping[str, Any] | None = None,
             action: str = "access", policy: RetryPolicy | None = None) -> T:
    """``call()`` under ``policy``; any failure comes out as a ``StorageError`` naming ``uri``.

    Only ``unavailable`` errors are retried; every retry is logged (WARNING, no secrets) and
    counted in the error's ``attempts``. ``call`` must be safe to repeat (a whole read, a
    listing page, a staged write that is moved into place).
    """
    policy = policy or DEFAULT_RETRY
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - every backend error becomes a StorageError
            err = storage_error(exc, uri, storage_options, action)
        err.attempts = attempt
        if not err.retryable:
            raise err from None
        elapsed = time.monotonic() - started
        pause = policy.delay(attempt)
        if attempt >= policy.attempts or elapsed + pause > policy.budget_s:
            raise StorageError(uri, f"{err.reason}; gave up after {attempt} attempt(s) in "
                                    f"{elapsed:.1f} s (retry budget: {policy.attempts} attempts, "
                                    f"{policy.budget_s:g} s)", err.kind, attempt) from None
        log.warning("storage %s: %s (attempt %d of %d); retrying in %.2f s",
                    err.kind, err, attempt, policy.attempts, pause)
        time.sleep(pause)


# -- listing ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One input object. ``size``/``etag``/``mtime`` are None when unknown (e.g. from a manifest
    without those columns). ``mtime`` is POSIX seconds. See the module doc for ``etag``."""

    uri: str
    size: int | None = None
    etag: str | None = None
    mtime: float | None = None


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What ``open_input`` found: one object, or a prefix/folder with at least one object."""

    uri: str
    is_prefix: bool
    first: ObjectInfo


def _normalize_extensions(extensions: Iterable[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return frozenset(e.lower().lstrip(".") for e in extensions if e)


def _wanted(name: str, extensions: frozenset[str] | None, skipped: Counter | None = None
            ) -> bool:
    """Whether `name` has a wanted extension; a name left out is counted in `skipped` under its
    extension ("" for none)."""
    if extensions is None:
        return True
    _, dot, ext = name.rpartition(".")
    wanted = bool(dot) and "/" not in ext and ext.lower() in extensions
    if not wanted and skipped is not None:
        skipped[ext.lower() if dot and "/" not in ext else ""] += 1
    return wanted


def _local_fingerprint(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _local_info(path: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(path, st.st_size, _local_fingerprint(st), st.st_mtime)


def _s3_info(bucket: str, obj: Mapping[str, Any]) -> ObjectInfo:
    modified = obj.get("LastModified")
    return ObjectInfo(
        uri=f"s3://{bucket}/{obj['Key']}",
        size=int(obj["Size"]) if obj.get("Size") is not None else None,
        etag=str(obj.get("ETag") or "").strip('"') or None,
        mtime=modified.timestamp() if modified is not None else None,
    )


def _s3_head(fs, bucket: str, key: str, uri: str, storage_options,
             retry: RetryPolicy | None) -> ObjectInfo | None:
    """The object's info, or None when there is no such key (or bucket: the caller lists next)."""
    try:
        head = retrying(lambda: fs.call_s3("head_object", Bucket=bucket, Key=key), uri,
                        storage_options, "read", retry)
    except StorageError as err:
        if err.kind == "not_found":
            return None
        raise
    return _s3_info(bucket, {"Key": key, "Size": head.get("ContentLength"),
                             "ETag": head.get("ETag"), "LastModified": head.get("LastModified")})


def _s3_pages(fs, bucket: str, prefix: str, uri: str, storage_options,
              retry: RetryPolicy | None, page_size: int = LIST_PAGE_SIZE):
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        page = retrying(partial(fs.call_s3, "list_objects_v2", **kwargs), uri,
                        storage_options, "list", retry)
        yield page.get("Contents") or []
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def _walk_s3(fs, path: str, extensions, uri: str, storage_options=None,
             retry: RetryPolicy | None = None, skipped: Counter | None = None
             ) -> Iterator[ObjectInfo]:
    bucket, key, _ = fs.split_path(path)
    prefix, denied = key, None
    if key and not key.endswith("/"):
        try:
            single = _s3_head(fs, bucket, key, uri, storage_options, retry)
        except StorageError as exc:
            if exc.kind != "access_denied":
                raise
            # HEAD's 403 has no reason; the listing below tells a wrong secret from a missing
            # grant. Keep the 403 in case the listing succeeds but is empty.
            single, denied = None, exc
        if single is not None:
            yield single
            return
        prefix = key + "/"
    seen_any = False
    for contents in _s3_pages(fs, bucket, prefix, uri, storage_options, retry):
        seen_any = seen_any or bool(contents)
        for obj in contents:
            name = obj["Key"]
            if not name.endswith("/") and _wanted(name, extensions, skipped):
                yield _s3_info(bucket, obj)
    if denied is not None and not seen_any:
        raise denied


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; a link that cannot be followed (a loop of links) is not."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _sorted_entries(folder: str) -> list[os.DirEntry]:
    # A folder sorts as "name/", so the depth-first walk yields paths in plain string order,
    # the order S3 lists keys in.
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name + "/" if _is_dir(e) else e.name)


def _folder_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _walk_local(root: str, extensions, skipped: Counter | None = None
                ) -> Iterator[ObjectInfo]:
    """Symbolic links are followed, and what they reach is listed under the link's path: a
    file reached through two paths is listed once per path, as each path is an input of its
    own. A link to a folder being walked (a loop) is skipped with a warning: its files are
    listed already. A broken link with a wanted name is listed without size or etag, so that
    reading it makes an error row (see `_read`) rather than a file missing from every count."""
    if os.path.isfile(root):
        yield _local_info(root, os.stat(root))
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    stack = [iter(_sorted_entries(root))]  # one folder's entries in memory per level
    walking = [_folder_id(os.stat(root))]  # the folders in `stack`, to detect loops
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            walking.pop()
        elif _is_dir(entry):
            folder = _folder_id(entry.stat())
            if folder in walking:
                log.warning("not following %s: it links to a folder above it", entry.path)
            else:
                stack.append(iter(_sorted_entries(entry.path)))
                walking.append(folder)
        elif _wanted(entry.name, extensions, skipped):
            if entry.is_symlink() and not os.path.exists(entry.path):
                yield ObjectInfo(entry.path)  # a broken link
            elif entry.is_file():
                yield _local_info(entry.path, entry.stat())


def _walk_generic(fs, path: str, extensions, skipped: Counter | None = None
                  ) -> Iterator[ObjectInfo]:
    def info(p: str, d: Mapping[str, Any]) -> ObjectInfo:
        etag = d.get("ETag") or d.get("etag") or d.get("md5Hash") or d.get("md5")
        mtime = d.get("mtime") or d.get("created") or d.get("LastModified")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        if etag is None and mtime is not None and d.get("size") is not None:
            etag = f"{mtime}-{d['size']}"
        return ObjectInfo(_uri(fs, p), d.get("size"), str(etag).strip('"') if etag else None,
                          float(mtime) if isinstance(mtime, (int, float)) else None)

    if fs.isfile(path):
        yield info(path, fs.info(path))
        return
    if not fs.isdir(path):
        raise FileNotFoundError(path)
    for folder, _, files in fs.walk(path, detail=True):
        for name in sorted(files):
            if _wanted(name, extensions, skipped):
                yield info(f"{folder.rstrip('/')}/{name}", files[name])


def list_objects(uri: str, extensions: Iterable[str] | None = AUDIO_EXTENSIONS,
                 storage_options: Mapping[str, Any] | None = None,
                 retry: RetryPolicy | None = None,
                 skipped: Counter | None = None) -> Iterator[ObjectInfo]:
    """Stream the objects under ``uri`` whose extension (case-insensitive) is in ``extensions``
    (``None``: all). A URI naming one object yields that object, whatever its extension.
    ``skipped`` counts the objects left out, by extension.

    S3 is walked with ``list_objects_v2`` one page at a time (each page retried under
    ``retry``); local folders depth-first, following links (see ``_walk_local``). Both yield
    in plain string order of the path/key.
    Errors surface as ``StorageError`` when the walk reaches them.
    """
    exts = _normalize_extensions(extensions)
    fs, path = resolve(uri, storage_options)
    if _is_s3(fs):
        walk = _walk_s3(fs, path, exts, uri, storage_options, retry, skipped)
    elif is_local(fs):
        walk = _walk_local(path, exts, skipped)
    else:
        walk = _walk_generic(fs, path, exts, skipped)
    with _translated(uri, storage_options, "list"):
        yield from walk


# -- manifests -------------------------------------------------------------------------------

def _manifest_format(path: str) -> str | None:
    lowered = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".xz"):
        if lowered.endswith(suffix) and not lowered.endswith(".parquet" + suffix):
            lowered = lowered[: -len(suffix)]
            break
    return MANIFEST_FORMATS.get(posixpath.splitext(lowered)[1])


def is_manifest(uri: str) -> bool:
    """True when ``uri`` names a Parquet/CSV/JSONL manifest (by its suffix)."""
    return _manifest_format(uri.split("?", 1)[0]) is not None


def _resolve_entry(entry: str, fs, manifest_path: str) -> str:
    """An entry with a scheme stays (a local `file://` one becomes the path a listing gives, so
    that two spellings of one file are one input); otherwise it is relative to the manifest's
    folder. A leading '/' means an absolute path in a local manifest and the bucket root in an
    S3 manifest."""
    for local in ("file://localhost/", "file:///"):
        if entry.startswith(local):
            return os.path.normpath("/" + entry[len(local):])
    if "://" in entry:
        return entry
    if is_local(fs):
        return os.path.normpath(os.path.join(os.path.dirname(manifest_path), entry))
    if entry.startswith("/"):
        root = manifest_path.split("/", 1)[0] if _is_s3(fs) else ""
        return _uri(fs, posixpath.normpath(f"{root}/{entry.lstrip('/')}").lstrip("/"))
    return _uri(fs, posixpath.normpath(posixpath.join(posixpath.dirname(manifest_path), entry)))


def _manifest_rows(fmt: str, handle, uri: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(row number, row dict) in file order, streaming."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(handle)
        names = pf.schema_arrow.names
        column = next((c for c in MANIFEST_URI_COLUMNS if c in names), None)
        if column is None:
            raise StorageError(uri, f"no {'/'.join(MANIFEST_URI_COLUMNS)} column "
                                    f"(columns: {names})", "bad_manifest")
        wanted = [c for c in (column, "size", "etag") if c in names]
        number = 0
        for batch in pf.iter_batches(batch_size=4096, columns=wanted):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif fmt == "csv":
        reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
        if not reader.fieldnames:
            raise StorageError(uri, "empty CSV (no header row)", "bad_manifest")
        if not any(c in reader.fieldnames for c in MANIFEST_URI_COLUMNS):
            raise StorageError(uri, f"no {'/'.join(MANIFEST_URI_COLUMNS)} column "
                                    f"(columns: {reader.fieldnames})", "bad_manifest")
        for number, row in enumerate(reader, start=1):
            yield number, {k: (v if v != "" else None) for k, v in row.items() if k is not None}
    else:
        for number, line in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StorageError(uri, f"line {number}: not JSON ({exc.msg})",
                                   "bad_manifest") from None
            if not isinstance(row, dict):
                raise StorageError(uri, f"line {number}: expected a JSON object",
                                   "bad_manifest")
            yield number, row


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None,
                  retry: RetryPolicy | None = None) -> Iterator[ObjectInfo]:
    """Stream the entries of a Parquet, CSV or JSON-lines manifest.

    Each row needs a ``uri`` (or ``source_uri``/``path``) column; ``size`` and ``etag`` are
    optional. Entries without a scheme resolve against the manifest's folder (an absolute local
    path stays as is in a local manifest). ``.gz``/``.bz2``/``.zst``/``.xz`` CSV/JSONL files are
    decompressed. Problems raise ``StorageError`` of kind ``bad_manifest`` naming file and row.
    """
    fs, path = resolve(uri, storage_options)
    fmt = _manifest_format(path)
    if fmt is None:
        raise StorageError(uri, "unknown manifest format (expected .parquet, .csv or .jsonl)",
                           "bad_manifest")
    handle = retrying(lambda: fs.open(path, "rb", compression=None if fmt == "parquet"
                                      else "infer"), uri, storage_options, "read manifest", retry)
    column: str | None = None
    with handle:
        try:
            for number, row in _manifest_rows(fmt, handle, uri):
                if column is None:
                    column = next((c for c in MANIFEST_URI_COLUMNS if c in row), None)
                    if column is None:
                        raise StorageError(uri, f"no {'/'.join(MANIFEST_URI_COLUMNS)} column "
                                                f"(columns: {sorted(row)})", "bad_manifest")
                entry = row.get(column)
                if not isinstance(entry, str) or not entry.strip():
                    raise StorageError(uri, f"row {number}: empty or non-text {column!r}",
                                       "bad_manifest")
                size = row.get("size")
                try:
                    size = int(size) if size is not None else None
                except (TypeError, ValueError):
                    raise StorageError(uri, f"row {number}: size {size!r} is not an integer",
                                       "bad_manifest") from None
                etag = row.get("etag")
                yield ObjectInfo(_resolve_entry(entry.strip(), fs, path), size,
                                 str(etag).strip('"') if etag not in (None, "") else None)
        except StorageError:
            raise
        except (UnicodeDecodeError, csv.Error, EOFError) as exc:
            raise StorageError(uri, f"unreadable {fmt} manifest ({type(exc).__name__}: {exc})",
                               "bad_manifest") from None
        except Exception as exc:  # noqa: BLE001 - parquet errors come from many places
            if type(exc).__module__.startswith("pyarrow"):
                raise StorageError(uri, f"unreadable {fmt} manifest ({exc})",
                                   "bad_manifest") from None
            raise storage_error(exc, uri, storage_options, "read manifest") from None


# -- preflight checks ------------------------------------------------------------------------

def _s3_bucket_check(fs, bucket: str, uri: str, storage_options,
                     retry: RetryPolicy | None) -> None:
    """bucket_missing / credential errors for the bucket itself. A 403 on HEAD is not final: it
    carries no reason (HEAD has no body), and an identity may lack ListBucket yet read or write
    objects, so the caller's next request reports the precise error."""
    def head() -> None:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except Exception as exc:  # sorted by error code; the rest go to `retrying`
            detail = _client_error(exc)
            code = detail[0] if detail else None
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(uri, f"bucket {bucket!r} does not exist",
                                   "bucket_missing") from None
            if code != "403":
                raise

    retrying(head, uri, storage_options, "bucket check", retry)


def _checked_bucket(fs, path: str, uri: str, storage_options,
                    retry: RetryPolicy | None) -> tuple[str, str]:
    """(bucket, key) of an S3 path whose bucket exists and answers these credentials."""
    bucket, key, _ = fs.split_path(path)
    if not bucket:
        raise StorageError(uri, "no bucket in the URI", "not_found")
    _s3_bucket_check(fs, bucket, uri, storage_options, retry)
    return bucket, key


def open_input(uri: str, storage_options: Mapping[str, Any] | None = None,
               retry: RetryPolicy | None = None) -> InputInfo:
    """Check, before any Ray work, that ``uri`` names an object or a non-empty prefix/folder
    that these credentials can read. Raises ``StorageError`` (not_found, access_denied,
    no_credentials, bucket_missing, unavailable, io_error)."""
    with _translated(uri, storage_options, "read"):
        fs, path = resolve(uri, storage_options)
        if _is_s3(fs):
            bucket, key = _checked_bucket(fs, path, uri, storage_options, retry)
            first = next(_walk_s3(fs, path, None, uri, storage_options, retry), None)
            if first is not None and first.uri == f"s3://{bucket}/{key}":
                return InputInfo(first.uri, False, first)
        elif is_local(fs):
            if os.path.isfile(path):
                with open(path, "rb"):
                    pass
                info = _local_info(path, os.stat(path))
                return InputInfo(path, False, info)
            first = next(_walk_local(path, None), None)
        else:
            if fs.isfile(path):
                info = next(_walk_generic(fs, path, None))
                return InputInfo(info.uri, False, info)
            first = next(_walk_generic(fs, path, None), None)
    if first is None:
        raise StorageError(uri, "no object or folder with objects at this location", "not_found")
    return InputInfo(uri, True, first)


def check_output(uri: str, storage_options: Mapping[str, Any] | None = None,
                 retry: RetryPolicy | None = None) -> None:
    """Check that ``uri`` (a prefix/folder) is writable by writing and deleting a probe object.
    Raises ``StorageError`` (bucket_missing, access_denied, no_credentials, unavailable,
    io_error)."""
    probe_name = PROBE_PREFIX + uuid.uuid4().hex
    with _translated(uri, storage_options, "write"):
        fs, path = resolve(uri, storage_options)
        if _is_s3(fs):
            bucket, key = _checked_bucket(fs, path, uri, storage_options, retry)
            probe_key = f"{key.rstrip('/')}/{probe_name}" if key else probe_name
            retrying(lambda: fs.call_s3("put_object", Bucket=bucket, Key=probe_key,
                                        Body=b"probe"), uri, storage_options, "write", retry)
            try:
                retrying(lambda: fs.call_s3("delete_object", Bucket=bucket, Key=probe_key),
                         uri, storage_options, "delete of the write probe", retry)
            except StorageError as err:
                raise StorageError(uri, f"wrote s3://{bucket}/{probe_key} but could not delete "
                                        f"it: {err.reason}", err.kind) from None
            return
        if is_local(fs) and os.path.exists(path) and not os.path.isdir(path):
            raise StorageError(uri, "exists and is not a folder", "io_error")
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/{probe_name}"
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)


# -- reading ---------------------------------------------------------------------------------

def fetch(source: ObjectInfo | str, storage_options: Mapping[str, Any] | None = None, *,
          retry: RetryPolicy | None = None) -> bytes:
    """The whole object, read under ``retry`` (see ``retrying``); a missing object raises
    ``ObjectVanishedError`` (it was listed, so it vanished since)."""
    uri = source.uri if isinstance(source, ObjectInfo) else source
    fs, path = resolve(uri, storage_options)
    return _read(lambda: fs.cat_file(path), uri, storage_options, retry)


SPOOL_BYTES = 64 << 20  # a larger object is decoded from a local file, not from memory


@contextmanager
def fetched(uri: str, storage_options: Mapping[str, Any] | None = None, *,
            retry: RetryPolicy | None = None, size: int | None = None,
            spool_bytes: int = SPOOL_BYTES) -> Iterator[tuple[bytes | str, int]]:
    """The object for a decoder, with its size: its bytes (`fetch`), or, when its listed `size`
    is over `spool_bytes`, a local path: a local object's own, or a copy downloaded under
    ``retry`` into the temp dir and removed on exit. A decoder reads a path block by block, so
    an archive of gigabytes (6 h of 48 kHz stereo WAV is 4 GB) never sits in memory whole.
    A missing object raises ``ObjectVanishedError`` either way."""
    if size is None or size <= spool_bytes:
        data = fetch(uri, storage_options, retry=retry)
        yield data, len(data)
        return
    fs, path = resolve(uri, storage_options)
    if is_local(fs):
        yield path, _read(lambda: fs.size(path), uri, storage_options, retry)
        return
    with tempfile.TemporaryDirectory(prefix="kimi-label-fetch-") as folder:
        local = os.path.join(folder, "object")
        _read(lambda: fs.get_file(path, local), uri, storage_options, retry)
        yield local, os.path.getsize(local)


def _read(call: Callable[[], T], uri: str, storage_options, retry: RetryPolicy | None) -> T:
    try:
        return retrying(call, uri, storage_options, "read", retry)
    except StorageError as err:
        broken = _broken_link(uri, err)
        if broken is not None:  # listed as such: it did not vanish, it was never readable
            raise StorageError(uri, broken, err.kind, err.attempts) from None
        if err.kind == "not_found":
            raise ObjectVanishedError(uri, "not found when read (it was listed, or named in "
                                           "the manifest)", attempts=err.attempts) from None
        raise


def _broken_link(uri: str, err: StorageError) -> str | None:
    """Why a local symbolic link that failed to read cannot be followed; None when `uri` is
    not such a link."""
    if _protocol(uri) != "file":
        return None
    _, path = resolve(uri)
    try:
        if not os.path.islink(path) or os.path.exists(path):
            return None
        target = os.readlink(path)
    except OSError:
        return None
    why = "does not exist" if err.kind == "not_found" else f"cannot be followed ({err.reason})"
    return f"broken symbolic link: its target {target!r} {why}"
