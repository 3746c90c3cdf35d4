"""Pre-flight checks of an input and an output, before any Ray work."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from pipelines.storage.errors import StorageError, client_error, translated
from pipelines.storage.filesystem import is_local_fs, is_s3_fs, resolve
from pipelines.storage.listing import ObjectInfo, local_info, walk_generic, walk_local, walk_s3
from pipelines.storage.retry import RetryPolicy, retrying
from pipelines.storage.uri import s3_uri

PROBE_PREFIX = ".kimi-label-write-probe-"


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What ``open_input`` found: one object, or a prefix/folder with at least one object."""

    uri: str
    is_prefix: bool
    first: ObjectInfo



def _s3_bucket_check(fs, bucket: str, uri: str, storage,
                     retry: RetryPolicy | None) -> None:
    """bucket_missing / credential errors for the bucket itself. A 403 on HEAD is not final: it
    carries no reason (HEAD has no body), and an identity may lack ListBucket yet read or write
    objects, so the caller's next request reports the precise error."""
    def head() -> None:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except Exception as exc:  # sorted by error code; the rest go to `retrying`
            detail = client_error(exc)
            code = detail[0] if detail else None
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(uri, f"bucket {bucket!r} does not exist",
                                   "bucket_missing") from None
            if code != "403":
                raise

    retrying(head, uri, storage, "bucket check", retry)


def _checked_bucket(fs, path: str, uri: str, storage,
                    retry: RetryPolicy | None) -> tuple[str, str]:
    """(bucket, key) of an S3 path whose bucket exists and answers these credentials."""
    bucket, key, _ = fs.split_path(path)
    if not bucket:
        raise StorageError(uri, "no bucket in the URI", "not_found")
    _s3_bucket_check(fs, bucket, uri, storage, retry)
    return bucket, key


def open_input(uri: str, storage=None,
               retry: RetryPolicy | None = None) -> InputInfo:
    """Check, before any Ray work, that ``uri`` names an object or a non-empty prefix/folder
    that these credentials can read. Raises ``StorageError`` (not_found, access_denied,
    no_credentials, bucket_missing, unavailable, io_error)."""
    with translated(uri, storage, "read"):
        fs, path = resolve(uri, storage)
        if is_s3_fs(fs):
            bucket, key = _checked_bucket(fs, path, uri, storage, retry)
            first = next(walk_s3(fs, path, None, uri, storage, retry), None)
            if first is not None and first.uri == s3_uri(bucket, key):
                return InputInfo(first.uri, False, first)
        elif is_local_fs(fs):
            if os.path.isfile(path):
                with open(path, "rb"):
                    pass
                info = local_info(path, os.stat(path))
                return InputInfo(path, False, info)
            first = next(walk_local(path, None), None)
        else:
            if fs.isfile(path):
                info = next(walk_generic(fs, path, None))
                return InputInfo(info.uri, False, info)
            first = next(walk_generic(fs, path, None), None)
    if first is None:
        raise StorageError(uri, "no object or folder with objects at this location", "not_found")
    return InputInfo(uri, True, first)


def check_output(uri: str, storage=None,
                 retry: RetryPolicy | None = None) -> None:
    """Check that ``uri`` (a prefix/folder) is writable by writing and deleting a probe object.
    Raises ``StorageError`` (bucket_missing, access_denied, no_credentials, unavailable,
    io_error)."""
    probe_name = PROBE_PREFIX + uuid.uuid4().hex
    with translated(uri, storage, "write"):
        fs, path = resolve(uri, storage)
        if is_s3_fs(fs):
            bucket, key = _checked_bucket(fs, path, uri, storage, retry)
            probe_key = f"{key.rstrip('/')}/{probe_name}" if key else probe_name
            retrying(lambda: fs.call_s3("put_object", Bucket=bucket, Key=probe_key,
                                        Body=b"probe"), uri, storage, "write", retry)
            try:
                retrying(lambda: fs.call_s3("delete_object", Bucket=bucket, Key=probe_key),
                         uri, storage, "delete of the write probe", retry)
            except StorageError as err:
                raise StorageError(uri, f"wrote s3://{bucket}/{probe_key} but could not delete "
                                        f"it: {err.reason}", err.kind) from None
            return
        if is_local_fs(fs) and os.path.exists(path) and not os.path.isdir(path):
            raise StorageError(uri, "exists and is not a folder", "io_error")
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/{probe_name}"
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)

