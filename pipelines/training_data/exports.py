"""The exports that hold each segment's audio (lhotse, hf), written as the Parquet shards are.

`AudioExports.write(split, number, shard)` takes the rows of Parquet shard `number` of `split`,
`ROWS_PER_ROW_GROUP` at a time: each row's FLAC (`SegmentAudio`, the one place a segment
becomes audio) goes into the HF shard's next row group and into the lhotse export (its file,
recording and supervision); the HF shard is uploaded once it is complete. `close()` uploads
the lhotse manifests. In memory: one batch of FLACs and one source's waveform; on local disk:
one HF shard and the lhotse manifests, in a temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

import pyarrow as pa

from pipelines.storage import write_atomic
from pipelines.training_data.audio import SegmentAudio
from pipelines.training_data.hf import ROWS_PER_ROW_GROUP, HfShardFile
from pipelines.training_data.lhotse_manifests import LhotseManifests
from pipelines.training_data.output import hf_shard


def put_file(fs, root: str, relative: str, local: str) -> dict[str, Any]:
    """The local file `local` staged and moved to `<root>/<relative>`; its size and sha256."""
    digest = hashlib.sha256()
    with open(local, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)

    def copy(target) -> None:
        with open(local, "rb") as handle:
            shutil.copyfileobj(handle, target, 1 << 20)

    write_atomic(fs, root, relative, copy)
    return {"bytes": os.path.getsize(local), "sha256": digest.hexdigest()}


class AudioExports:
    """The lhotse and hf exports of a build (those of `formats`), into `root` on `fs`."""

    def __init__(self, fs, root: str, formats: list[str], tasks: list[str],
                 audio: SegmentAudio):
        self.fs, self.root, self.audio = fs, root, audio
        self.workdir = tempfile.TemporaryDirectory(prefix="kimi-label-exports-")
        self.hf = "hf" in formats
        self.lhotse = (LhotseManifests(fs, root, tasks, self.workdir.name)
                       if "lhotse" in formats else None)

    def write(self, split: str, number: int, shard: pa.Table) -> list[dict[str, Any]]:
        """Shard `number` of `split` in each export; the manifest.json entries written."""
        local = f"{self.workdir.name}/hf-shard.parquet"
        hf_file = HfShardFile(local, shard.schema) if self.hf else None
        for offset in range(0, shard.num_rows, ROWS_PER_ROW_GROUP):
            rows = shard.slice(offset, ROWS_PER_ROW_GROUP)
            flacs = [self.audio.flac(uri, start, end) for uri, start, end in zip(
                rows["source_uri"].to_pylist(), rows["start_s"].to_pylist(),
                rows["end_s"].to_pylist())]
            if hf_file is not None:
                hf_file.write(rows, flacs)
            if self.lhotse is not None:
                self.lhotse.add(split, number, rows, flacs)
        entries = []
        if hf_file is not None:
            hf_file.close()
            entries.append(self._upload(local, hf_shard(split, number), "hf", split,
                                        shard.num_rows))
            os.remove(local)
        if self.lhotse is not None:
            entries.append(self.lhotse.audio_entry(split, number))
        return [e for e in entries if e is not None]

    def close(self) -> list[dict[str, Any]]:
        """Upload the lhotse manifests and remove the local files; their entries."""
        try:
            done = self.lhotse.close() if self.lhotse is not None else []
            return [self._upload(local, relative, "lhotse", split, rows)
                    for local, relative, split, rows in done]
        finally:
            self.workdir.cleanup()

    def _upload(self, local: str, relative: str, fmt: str, split: str,
                rows: int) -> dict[str, Any]:
        return {"path": relative, "split": split, "format": fmt, "rows": rows,
                **put_file(self.fs, self.root, relative, local)}
