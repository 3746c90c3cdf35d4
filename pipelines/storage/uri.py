"""How a location is spelled: the one place that knows URI forms.

A location is a local path, `file://` URI, `s3://` (or Hadoop's `s3a://`) URI, or any other
fsspec URI (`memory://`, `gs://`...). Every object a run labels is written in its rows in one
*canonical* spelling (`canonical_uri`), and everything that compares objects (the planner,
manifests, evaluation references, subtitle names) goes through it, so that two spellings of one
object are one input:

  * local: an absolute, normalised path, `~` expanded; `file://`, `file:///` and
    `file://localhost/` are dropped (`./a/../b.wav` -> `/cwd/b.wav`);
  * S3: `s3://bucket/key` (`s3a://` is the same store), the key without `//`, `./` or `..`
    parts; a key above its bucket names no object (`ValueError`);
  * any other scheme: lower-cased, the path as written (each fsspec filesystem has its own
    rules; listings spell such objects as fsspec does).

A relative spelling is relative to a `base` folder (a manifest's or a references file's folder),
else to the working directory. A leading '/' in a remote base means the bucket's root.
"""

from __future__ import annotations

import os
import posixpath

S3_SCHEMES = ("s3", "s3a")
_LOCAL_PREFIXES = ("file://localhost/", "file:///", "file://")


def scheme(uri: str) -> str:
    """`s3` for s3:// and s3a://, `file` for a local path or file:// URI, else the scheme."""
    head, sep, _ = uri.partition("://")
    if not sep:
        return "file"
    head = head.lower()
    return "s3" if head in S3_SCHEMES else head


def is_s3(uri: str) -> bool:
    return scheme(uri) == "s3"


def is_local(uri: str) -> bool:
    return scheme(uri) == "file"


def split(uri: str) -> tuple[str, str]:
    """(scheme, path) without touching storage: a local path absolute and normalised, a remote
    one as written without leading slashes (`memory:///x` and `memory://x` are one)."""
    kind = scheme(uri)
    if kind == "file":
        return kind, local_path(uri)
    return kind, uri.partition("://")[2].lstrip("/")


def _without_file_scheme(uri: str) -> str:
    for prefix in _LOCAL_PREFIXES:
        if uri[:len(prefix)].lower() == prefix:  # (schemes are case-insensitive)
            rest = uri[len(prefix):]
            return rest if prefix == "file://" else "/" + rest
    return uri


def local_path(uri: str) -> str:
    """The absolute, normalised path of a local path or file:// URI."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(_without_file_scheme(uri))))


def canonical_uri(uri: str, base: str | None = None) -> str:
    """The one spelling of an object (module docstring); `base`: the folder a relative `uri`
    is relative to (default: the working directory). Raises ValueError for an S3 URI whose key
    is empty or above its bucket."""
    uri = uri.strip()
    if is_local(uri):
        path = os.path.expanduser(_without_file_scheme(uri))
        if base is None or os.path.isabs(path) and is_local(base):
            return local_path(path)
        if is_local(base):
            return local_path(os.path.join(local_path(base), path))
        kind, folder = scheme(base), base.partition("://")[2]  # a remote folder, as written
        bucket = folder.lstrip("/").split("/", 1)[0]
        if not path.startswith("/"):
            joined = posixpath.normpath(posixpath.join(folder, path))
        else:  # an S3 bucket's root; another filesystem's own root
            joined = bucket + path if kind == "s3" else path
        if kind == "s3" and joined.lstrip("/").split("/", 1)[0] != bucket:
            raise ValueError(f"{uri}: above the bucket of {base}: names no object")
        uri = f"{kind}://{joined}"
    kind, path = split(uri)
    if kind != "s3":  # as written: each fsspec filesystem has its own path rules
        return f"{kind}://{uri.partition('://')[2]}"
    bucket, _, key = path.partition("/")
    key = posixpath.normpath(key.lstrip("/")) if key.strip("/") else ""
    if not bucket or not key or key == ".." or key.startswith("../"):
        raise ValueError(f"{uri}: names no object (a bucket and a key below it are needed)")
    return s3_uri(bucket, key)


def s3_uri(bucket: str, key: str = "") -> str:
    """The URI of an S3 object (or, without a key, of a bucket) as listed: its key as stored."""
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def folder_of(uri: str) -> str:
    """The folder a file URI sits in, spelled as the file is (for relative entries in it)."""
    if is_local(uri):
        return os.path.dirname(local_path(uri))
    head, _, path = uri.partition("://")
    return f"{head}://{posixpath.dirname(path)}"


def redact(value: object, keep: int = 0) -> str:
    """`value` as a masked string; `keep` leading characters stay visible (only for ids)."""
    text = "" if value is None else str(value)
    if not text:
        return ""
    keep = min(keep, len(text) // 3)  # never reveal most of a short value
    return text[:keep] + "***"


def redact_uri(uri: str) -> str:
    """Hide a password embedded in a URI (`s3://KEY:SECRET@bucket/...`)."""
    head, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{head}://{redact(user, keep=4)}:***@{host}"
