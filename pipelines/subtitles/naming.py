"""Which name an object's subtitles get: `<output>/subtitles/<name>.srt` and `.vtt`. No I/O.

  * The name is the object's path below its input's folder, extension kept (`a/b.wav` ->
    `a/b.wav`). That folder (`input_prefix`) is the input itself for a folder or prefix, the
    folder holding it for a manifest or a single object.
  * An object outside that folder (a manifest entry elsewhere) is named by its basename, or
    by a short hash of its URI when its path has none.
  * Every part of a name is one any filesystem takes (`safe_relative`).
  * When two objects of one run would share a name, each of them gets a short hash of its URI
    (`b.wav.1a2b3c4d`, `with_hash`). So does an object of this run whose name an earlier
    run's object holds (runs on sibling folders whose recorders repeat file names,
    `run_names`): an earlier object's subtitles are never taken over.
  * A run's `Naming` (its folder and the objects it named otherwise) is recorded
    (`pipelines.subtitles.recorded`), so that later runs find an earlier object's subtitles
    under the name its run gave it (`Naming.names_of`), whatever their own input is.

A folder is a `(scheme, path)` pair as `pipelines.storage.uri.split` gives it: a local path
absolute and normalised, a remote one without its scheme and leading slashes (`memory:///x` and
`memory://x` are one), `s3a://` the same store as `s3://`.
"""

from __future__ import annotations

import hashlib
import posixpath
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pipelines.storage.uri import split

Folder = tuple[str, str]  # (scheme, path), as `pipelines.storage.uri.split` gives it

PART_BYTES = 200  # a longer name part is cut: with a hash and .srt/.vtt it stays under 255 bytes
CUT_BYTES = 180  # what is kept of a longer part, before its hash
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs")  # control and format characters, lone surrogates
_UNSAFE_PARTS = ("", ".", "..")


def input_prefix(input_uri: str, is_manifest: bool, is_single_object: bool) -> Folder:
    """The folder the subtitle names of an input's objects are below: the input itself for a
    folder or prefix, the folder holding it for a manifest or a single object."""
    scheme, path = split(input_uri)
    path = path.rstrip("/") or path
    return scheme, posixpath.dirname(path) if is_manifest or is_single_object else path


def below(source_uri: str, folder: Folder) -> str | None:
    """`source_uri`'s path relative to `folder`, None when it is not below it."""
    scheme, path = split(source_uri)
    root = folder[1].rstrip("/")
    if scheme != folder[0] or not path.startswith(root + "/"):
        return None
    relative = posixpath.normpath(path[len(root) + 1:])
    return None if relative in (".", "..") or relative.startswith("../") else relative


def uri_hash(uri: str) -> str:
    """A short hash of a URI: what makes a name the object's own."""
    return hashlib.sha256(uri.encode()).hexdigest()[:8]


def relative_path(source_uri: str, folder: Folder) -> str:
    """`source_uri` below `folder`; else its basename, else (no basename) its URI's hash."""
    relative = below(source_uri, folder)
    if relative is not None:
        return relative
    return posixpath.basename(split(source_uri)[1].rstrip("/")) or uri_hash(source_uri)


def _safe_part(part: str) -> str:
    part = "".join("_" if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in part)
    if part in _UNSAFE_PARTS:
        return "_"
    encoded = part.encode("utf-8", "surrogatepass")
    if len(encoded) <= PART_BYTES:
        return part
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    return encoded[:CUT_BYTES].decode("utf-8", "ignore") + digest


def safe_relative(relative: str) -> str:
    """A relative path every filesystem takes: control and format characters (NUL, newline,
    bidi overrides) become '_', '', '.' and '..' parts become '_', and a part over 200 bytes is
    cut and given a hash of itself (names stay under the 255-byte limit with .srt/.vtt)."""
    return "/".join(_safe_part(part) for part in relative.split("/"))


def with_hash(name: str, uri: str) -> str:
    """`name` made the object's own: a short hash of its URI appended (`b.wav.1a2b3c4d`)."""
    return f"{name}.{uri_hash(uri)}"


def subtitle_names(source_uris: Iterable[str], folder: Folder) -> dict[str, str]:
    """source URI -> relative path of its subtitles (without .srt/.vtt), unique within the list."""
    names = {uri: safe_relative(relative_path(uri, folder)) for uri in sorted(set(source_uris))}
    shared = Counter(names.values())
    return {uri: with_hash(name, uri) if shared[name] > 1 else name
            for uri, name in names.items()}


@dataclass(frozen=True)
class Naming:
    """How a run named its subtitles: the folder its names are below, and the objects it named
    otherwise than `subtitle_names` would (source URI -> name)."""

    folder: Folder
    renamed: Mapping[str, str] = field(default_factory=dict)

    def names_of(self, source_uris: Iterable[str]) -> dict[str, str]:
        """The names the run gave these objects."""
        names = subtitle_names(source_uris, self.folder)
        names.update({uri: self.renamed[uri] for uri in names if uri in self.renamed})
        return names


def claimed_names(ok_uris_by_run: Mapping[str, list[str]],
                  namings: Mapping[str, Naming]) -> dict[str, str]:
    """Subtitle name -> the earlier object whose subtitles it holds, from the runs with a
    recorded naming (`ok_uris_by_run`: run id -> its ok objects); the earliest run id's wins."""
    claimed: dict[str, str] = {}
    for run_id in sorted(ok_uris_by_run):
        if run_id in namings:
            for uri, name in namings[run_id].names_of(ok_uris_by_run[run_id]).items():
                claimed.setdefault(name, uri)
    return claimed


def run_names(source_uris: Iterable[str], folder: Folder,
              claimed: Mapping[str, str]) -> tuple[dict[str, str], Naming]:
    """This run's names of its objects, and its `Naming`: `subtitle_names`, except that an
    object whose name an earlier object holds (`claimed`) gets its URI's hash."""
    names = subtitle_names(source_uris, folder)
    renamed = {uri: with_hash(name, uri) for uri, name in names.items()
               if claimed.get(name, uri) != uri}
    return {**names, **renamed}, Naming(folder, renamed)
