"""A run's subtitle `Naming`, recorded in the output (`OutputLayout.subtitle_naming(run_id)`):

    {"protocol": "s3", "path": "audio/corpus",
     "renamed": {"s3://audio/corpus/day2/rec.wav": "rec.wav.1a2b3c4d"}}

`protocol` and `path` are the folder the run's names are below, `renamed` the objects it named
otherwise (`pipelines.subtitles.naming`). A run records it before it writes its subtitles. A run
that wrote none (stopped before its subtitles), or wrote them before runs recorded their naming,
has no recording: later runs name its objects as they name their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pipelines.storage.filesystem import uri_of
from pipelines.storage.layout import OutputLayout
from pipelines.storage.retry import RetryPolicy, retrying
from pipelines.subtitles.naming import Naming


def _to_json(naming: Naming) -> bytes:
    scheme, path = naming.folder
    return json.dumps({"protocol": scheme, "path": path, "renamed": dict(naming.renamed)}).encode()


def _from_json(body: bytes) -> Naming:
    data = json.loads(body)
    return Naming((data["protocol"], data["path"]), data.get("renamed") or {})


def record_naming(fs, layout: OutputLayout, run_id: str, naming: Naming,
                  retry: RetryPolicy | None = None) -> None:
    """Record how run `run_id` names its subtitles (`layout`: the output on `fs`)."""
    path = layout.subtitle_naming(run_id)
    body = _to_json(naming)

    def write() -> None:
        fs.makedirs(layout.run(run_id), exist_ok=True)
        fs.pipe_file(path, body)

    retrying(write, uri_of(fs, path), action="write", policy=retry)


def recorded_namings(fs, layout: OutputLayout, run_ids: Iterable[str],
                     retry: RetryPolicy | None = None) -> dict[str, Naming]:
    """Run id -> how it named its subtitles, for those of `run_ids` that recorded it, read in
    one batch of requests."""
    paths = [layout.subtitle_naming(run_id) for run_id in run_ids]
    found = retrying(lambda: fs.cat(paths, on_error="omit") if paths else {},
                     uri_of(fs, layout.runs), action="read", policy=retry)
    # the store spells the paths it found its own way: the run id is read back from each
    return {OutputLayout.run_id_of(path): _from_json(body) for path, body in found.items()}
