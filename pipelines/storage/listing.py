"""Listing the objects of an input, streamed.

`list_objects` yields while it walks (one S3 page, or one local folder level, in memory at a
time), so a bucket of millions of objects never becomes a list. Both S3 and local folders are
walked in plain string order of the key/path.

`ObjectInfo.etag` is the S3 ETag (quotes stripped). Local files have no ETag; they get the cheap
fingerprint `"<mtime_ns hex>-<size hex>"`: it changes on any rewrite that changes size or mtime
(mtime resolution is the kernel tick, a few ms, so a same-size rewrite in one tick keeps the
fingerprint), and survives moves within a filesystem.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from kimi_ops.audio.decode import AUDIO_FILE_EXTENSIONS
from pipelines.storage.errors import StorageError, translated
from pipelines.storage.filesystem import is_local_fs, is_s3_fs, resolve, uri_of
from pipelines.storage.retry import RetryPolicy, retrying
from pipelines.storage.uri import s3_uri

log = logging.getLogger("pipelines.storage")

AUDIO_EXTENSIONS = AUDIO_FILE_EXTENSIONS  # every container the decoder reads
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One input object. ``size``/``etag``/``mtime`` are None when unknown (e.g. from a manifest
    without those columns). ``mtime`` is POSIX seconds. See the module doc for ``etag``."""

    uri: str
    size: int | None = None
    etag: str | None = None
    mtime: float | None = None



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


def local_info(path: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(path, st.st_size, _local_fingerprint(st), st.st_mtime)


def _s3_info(bucket: str, obj: Mapping[str, Any]) -> ObjectInfo:
    modified = obj.get("LastModified")
    return ObjectInfo(
        uri=s3_uri(bucket, obj["Key"]),
        size=int(obj["Size"]) if obj.get("Size") is not None else None,
        etag=str(obj.get("ETag") or "").strip('"') or None,
        mtime=modified.timestamp() if modified is not None else None,
    )


def _s3_head(fs, bucket: str, key: str, uri: str, storage,
             retry: RetryPolicy | None) -> ObjectInfo | None:
    """The object's info, or None when there is no such key (or bucket: the caller lists next)."""
    try:
        head = retrying(lambda: fs.call_s3("head_object", Bucket=bucket, Key=key), uri,
                        storage, "read", retry)
    except StorageError as err:
        if err.kind == "not_found":
            return None
        raise
    return _s3_info(bucket, {"Key": key, "Size": head.get("ContentLength"),
                             "ETag": head.get("ETag"), "LastModified": head.get("LastModified")})


def _s3_pages(fs, bucket: str, prefix: str, uri: str, storage,
              retry: RetryPolicy | None, page_size: int = LIST_PAGE_SIZE):
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        page = retrying(partial(fs.call_s3, "list_objects_v2", **kwargs), uri,
                        storage, "list", retry)
        yield page.get("Contents") or []
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def walk_s3(fs, path: str, extensions, uri: str, storage=None,
             retry: RetryPolicy | None = None, skipped: Counter | None = None
             ) -> Iterator[ObjectInfo]:
    bucket, key, _ = fs.split_path(path)
    prefix, denied = key, None
    if key and not key.endswith("/"):
        try:
            single = _s3_head(fs, bucket, key, uri, storage, retry)
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
    for contents in _s3_pages(fs, bucket, prefix, uri, storage, retry):
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


def walk_local(root: str, extensions, skipped: Counter | None = None
                ) -> Iterator[ObjectInfo]:
    """Symbolic links are followed, and what they reach is listed under the link's path: a
    file reached through two paths is listed once per path, as each path is an input of its
    own. A link to a folder being walked (a loop) is skipped with a warning: its files are
    listed already. A broken link with a wanted name is listed without size or etag, so that
    reading it makes an error row (see `_read`) rather than a file missing from every count."""
    if os.path.isfile(root):
        yield local_info(root, os.stat(root))
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
                yield local_info(entry.path, entry.stat())


def walk_generic(fs, path: str, extensions, skipped: Counter | None = None
                  ) -> Iterator[ObjectInfo]:
    def info(p: str, d: Mapping[str, Any]) -> ObjectInfo:
        etag = d.get("ETag") or d.get("etag") or d.get("md5Hash") or d.get("md5")
        mtime = d.get("mtime") or d.get("created") or d.get("LastModified")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        if etag is None and mtime is not None and d.get("size") is not None:
            etag = f"{mtime}-{d['size']}"
        return ObjectInfo(uri_of(fs, p), d.get("size"), str(etag).strip('"') if etag else None,
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
                 storage=None,
                 retry: RetryPolicy | None = None,
                 skipped: Counter | None = None) -> Iterator[ObjectInfo]:
    """Stream the objects under ``uri`` whose extension (case-insensitive) is in ``extensions``
    (``None``: all). A URI naming one object yields that object, whatever its extension.
    ``skipped`` counts the objects left out, by extension.

    S3 is walked with ``list_objects_v2`` one page at a time (each page retried under
    ``retry``); local folders depth-first, following links (see ``walk_local``). Both yield
    in plain string order of the path/key.
    Errors surface as ``StorageError`` when the walk reaches them.
    """
    exts = _normalize_extensions(extensions)
    fs, path = resolve(uri, storage)
    if is_s3_fs(fs):
        walk = walk_s3(fs, path, exts, uri, storage, retry, skipped)
    elif is_local_fs(fs):
        walk = walk_local(path, exts, skipped)
    else:
        walk = walk_generic(fs, path, exts, skipped)
    with translated(uri, storage, "list"):
        yield from walk

