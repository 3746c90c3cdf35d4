"""Reading objects for a decoder: the whole object, or a local file for a large one; or, for a
look at a header, a few ranges of it (`opened_head`)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pipelines.storage import uri as uris
from pipelines.storage.errors import ObjectVanishedError, StorageError
from pipelines.storage.filesystem import is_local_fs, resolve
from pipelines.storage.listing import ObjectInfo
from pipelines.storage.retry import RetryPolicy, retrying

T = TypeVar("T")

def fetch(source: ObjectInfo | str, storage=None, *,
          retry: RetryPolicy | None = None) -> bytes:
    """The whole object, read under ``retry`` (see ``retrying``); a missing object raises
    ``ObjectVanishedError`` (it was listed, so it vanished since)."""
    uri = source.uri if isinstance(source, ObjectInfo) else source
    fs, path = resolve(uri, storage)
    return _read(lambda: fs.cat_file(path), uri, storage, retry)


SPOOL_BYTES = 64 << 20  # a larger object is decoded from a local file, not from memory


@contextmanager
def fetched(uri: str, storage=None, *,
            retry: RetryPolicy | None = None, size: int | None = None,
            spool_bytes: int = SPOOL_BYTES) -> Iterator[tuple[bytes | str, int]]:
    """The object for a decoder, with its size: its bytes (`fetch`), or, when its listed `size`
    is over `spool_bytes`, a local path: a local object's own, or a copy downloaded under
    ``retry`` into the temp dir and removed on exit. A decoder reads a path block by block, so
    an archive of gigabytes (6 h of 48 kHz stereo WAV is 4 GB) never sits in memory whole.
    A missing object raises ``ObjectVanishedError`` either way."""
    if size is None or size <= spool_bytes:
        data = fetch(uri, storage, retry=retry)
        yield data, len(data)
        return
    fs, path = resolve(uri, storage)
    if is_local_fs(fs):
        yield path, _read(lambda: fs.size(path), uri, storage, retry)
        return
    with tempfile.TemporaryDirectory(prefix="kimi-label-fetch-") as folder:
        local = os.path.join(folder, "object")
        _read(lambda: fs.get_file(path, local), uri, storage, retry)
        yield local, os.path.getsize(local)


def _read(call: Callable[[], T], uri: str, storage, retry: RetryPolicy | None) -> T:
    try:
        return retrying(call, uri, storage, "read", retry)
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
    if not uris.is_local(uri):
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



HEAD_BYTES = 1 << 20  # what a look at a header may read of an object at most
HEAD_BLOCK = 64 << 10  # a remote object's ranges: a header takes one or two (Ogg: and its end)


class BoundedReader(io.RawIOBase):
    """A seekable object file for a header reader (libsndfile's virtual I/O), reading at most
    `limit` bytes: past them, or when the store fails, it reads as at the end of the file and
    says so (`exhausted`, `error`); an exception would be lost in the C callback."""

    def __init__(self, handle, limit: int = HEAD_BYTES):
        self.handle, self.limit = handle, limit
        self.used = 0
        self.exhausted = False
        self.error: Exception | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def readinto(self, buffer) -> int:
        if self.error is not None:
            return 0
        if self.used >= self.limit:
            self.exhausted = True
            return 0
        view = memoryview(buffer)[:self.limit - self.used]
        try:
            data = self.handle.read(len(view))
        except Exception as exc:  # noqa: BLE001 - told to the caller after the C code returns
            self.error = exc
            return 0
        view[:len(data)] = data
        self.used += len(data)
        return len(data)


@contextmanager
def opened_head(uri: str, storage=None, limit: int = HEAD_BYTES) -> Iterator[BoundedReader]:
    """The object as a `BoundedReader` of at most `limit` bytes: a local file as it is, a remote
    one read in ranges of `HEAD_BLOCK` bytes as they are asked for, so a look at its header
    costs a request or two, not the object. Errors opening it are the backend's (callers
    translate them, e.g. with `retrying`); errors reading it are the reader's `error`."""
    fs, path = resolve(uri, storage)
    if is_local_fs(fs):
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    else:
        handle = fs.open(path, "rb", block_size=HEAD_BLOCK, cache_type="readahead")
    with handle:
        yield BoundedReader(handle, limit)
