"""A location -> an fsspec filesystem and a path on it (s3fs for S3).

`resolve(uri, storage)` gives `(filesystem, path)`: the path has no protocol and no trailing
slash; join children with `f"{path}/name"`. `uri_of(fs, path)` spells a path back as a URI.
"""

from __future__ import annotations

from pipelines.storage import uri as uris
from pipelines.storage.config import StorageConfig


def resolve(uri: str, storage=None):
    """`(filesystem, path)` for an `s3://` URI, any fsspec URI, or a local path; `storage`: a
    StorageConfig (or s3fs options, or None for the defaults and the AWS_* environment)."""
    import fsspec

    config = StorageConfig.coerce(storage)
    kind = uris.scheme(uri)
    if kind == "s3":
        import s3fs

        # no listings cache: other processes (Ray workers, other runs) write under the same
        # prefixes, and a stale listing would make `info` report new objects as missing
        opts = {"use_listings_cache": False, **config.s3fs_options()}
        # botocore tries once: `retrying` owns retries (no nested backoff, no retry storm)
        opts["config_kwargs"] = {"retries": {"total_max_attempts": 1},
                                 **(opts.get("config_kwargs") or {})}
        fs = s3fs.S3FileSystem(**opts)
        return fs, fs._strip_protocol(uri).rstrip("/")
    if kind == "file":
        return fsspec.filesystem("file"), uris.local_path(uri)  # options are the remote side's
    fs, path = fsspec.core.url_to_fs(uri, **config.fsspec_options())
    return fs, path.rstrip("/") or path


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def is_s3_fs(fs) -> bool:
    return any(p in uris.S3_SCHEMES for p in _protocols(fs))


def is_local_fs(fs) -> bool:
    return "file" in _protocols(fs)


def uri_of(fs, path: str) -> str:
    """The URI of a path on `fs` as `resolve` returned it."""
    if is_local_fs(fs):
        return path
    if is_s3_fs(fs):
        bucket, _, key = path.partition("/")
        return uris.s3_uri(bucket, key)
    return fs.unstrip_protocol(path)
