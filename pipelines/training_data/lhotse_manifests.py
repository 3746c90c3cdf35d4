"""The lhotse export: per split, a RecordingSet and a SupervisionSet as gzip JSONL, and the FLAC
file of every segment, which its recording points to.

    from lhotse import CutSet, load_manifest
    cuts = CutSet.from_manifests(
        recordings=load_manifest("<output>/lhotse/recordings_train.jsonl.gz"),
        supervisions=load_manifest("<output>/lhotse/supervisions_train.jsonl.gz"))
    cut = cuts[0]                   # one segment: cut.load_audio() is (1, n) float32, 16 kHz
    sup = cut.supervisions[0]       # sup.text, sup.language, sup.custom["emotion"], ...

One recording per segment, `lhotse/audio/<split>-<n>/<key>.flac`: the audio the model labelled
(`pipelines.training_data.audio`), so the cuts load wherever the output can be read, whatever
store the input was on and whatever format its audio had. The supervision covers the whole
recording (start 0, the segment's duration); where the segment lies in its source object is in
its custom fields `source_uri`, `segment_index`, `source_start_s` and `source_end_s`.

A recording's source is the FLAC's absolute path for a local output (lhotse type `file`), its
URI for any other (type `url`: lhotse reads it through smart_open, e.g. with
`pip install smart_open[s3]` and the AWS_* environment; AWS_ENDPOINT_URL for a store other than
AWS). A supervision's `text` is the transcript, `language` the language the asr task was asked
for (none for auto), and its custom fields hold every closed-set task's label and confidence
(`emotion`, `emotion_confidence`, `scene`, ...) and the `semantic_tokens` (12.5 Hz).

The manifests are written line by line into local files with lhotse's sequential writers, and
uploaded gzip-compressed with fixed header fields when the build closes (the same rows give the
same bytes); each FLAC is written in place as it is made (an interrupted build leaves no
manifest, and the next build clears what it wrote).
"""

from __future__ import annotations

import gzip
import os
import shutil
from typing import Any

import pyarrow as pa

from pipelines.storage import is_local_fs, retrying, uri_of
from pipelines.training_data.audio import SAMPLE_RATE
from pipelines.training_data.output import lhotse_audio_dir, lhotse_manifest

KINDS = ("recordings", "supervisions")


def num_samples(start_s: float, end_s: float) -> int:
    """A segment's length in 16 kHz samples, as `pipelines.training_data.audio` cuts it."""
    return round(end_s * SAMPLE_RATE) - round(start_s * SAMPLE_RATE)


def supervision_custom(row: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """A supervision's custom fields: the closed-set labels, the tokens, the source's place."""
    labels = {}
    for task in tasks:
        labels[task], labels[f"{task}_confidence"] = row[task], row[f"{task}_confidence"]
    return {**labels, "semantic_tokens": row["semantic_tokens"],
            "source_uri": row["source_uri"], "segment_index": row["segment_index"],
            "source_start_s": row["start_s"], "source_end_s": row["end_s"]}


class LhotseManifests:
    """The lhotse export of a build: FLACs put under `root` on `fs` as shards come, manifests
    kept in `workdir` (a local folder) until `close`."""

    def __init__(self, fs, root: str, tasks: list[str], workdir: str):
        self.fs, self.root, self.tasks, self.workdir = fs, root, tasks, workdir
        self.writers: dict[tuple[str, str], Any] = {}
        self.rows: dict[str, int] = {}
        self.audio: dict[tuple[str, int], list[int]] = {}  # shard -> [files, bytes]

    def add(self, split: str, number: int, rows: pa.Table, flacs: list[bytes]) -> None:
        """Rows of Parquet shard `number` of `split`, with each row's FLAC."""
        from lhotse import AudioSource, Recording, SupervisionSegment

        folder = f"{self.root}/{lhotse_audio_dir(split, number)}"
        if (split, number) not in self.audio:
            self.fs.makedirs(folder, exist_ok=True)
            self.audio[(split, number)] = [0, 0]
        for row, flac in zip(rows.to_pylist(), flacs):
            path = f"{folder}/{row['key']}.flac"
            self._put(path, flac)
            self.audio[(split, number)][0] += 1
            self.audio[(split, number)][1] += len(flac)
            n = num_samples(row["start_s"], row["end_s"])
            source = AudioSource(type="file" if is_local_fs(self.fs) else "url", channels=[0],
                                 source=os.path.abspath(path) if is_local_fs(self.fs)
                                 else uri_of(self.fs, path))
            self._writer("recordings", split).write(Recording(
                id=row["key"], sources=[source], sampling_rate=SAMPLE_RATE, num_samples=n,
                duration=n / SAMPLE_RATE))
            self._writer("supervisions", split).write(SupervisionSegment(
                id=row["key"], recording_id=row["key"], start=0.0, duration=n / SAMPLE_RATE,
                channel=0, text=row["transcript"], language=row["language"],
                custom=supervision_custom(row, self.tasks)))
        self.rows[split] = self.rows.get(split, 0) + rows.num_rows

    def audio_entry(self, split: str, number: int) -> dict[str, Any] | None:
        """The manifest.json entry of a shard's FLAC folder (its files and bytes)."""
        if (split, number) not in self.audio:
            return None
        files, size = self.audio[(split, number)]
        return {"path": f"{lhotse_audio_dir(split, number)}/", "split": split,
                "format": "lhotse-audio", "rows": files, "bytes": size}

    def close(self) -> list[tuple[str, str, str, int]]:
        """Close the manifests and gzip them: (local file, path below the output, split, rows)
        of each, in split then kind order, for the caller to upload."""
        done = []
        for (kind, split), writer in sorted(self.writers.items(), key=lambda kv: kv[0][::-1]):
            writer.close()
            compressed = f"{self.workdir}/{kind}_{split}.jsonl.gz"
            _gzip(f"{self.workdir}/{kind}_{split}.jsonl", compressed)
            done.append((compressed, lhotse_manifest(kind, split), split, self.rows[split]))
        return done

    def _writer(self, kind: str, split: str):
        from lhotse import RecordingSet, SupervisionSet

        if (kind, split) not in self.writers:
            opener = RecordingSet if kind == "recordings" else SupervisionSet
            self.writers[(kind, split)] = opener.open_writer(
                f"{self.workdir}/{kind}_{split}.jsonl")
        return self.writers[(kind, split)]

    def _put(self, path: str, data: bytes) -> None:
        retrying(lambda: self.fs.pipe_file(path, data), uri_of(self.fs, path), action="write")


def _gzip(source: str, target: str) -> None:
    """`source` gzip-compressed into `target`, with no name and a zero time in the header."""
    with open(source, "rb") as raw, open(target, "wb") as out, \
            gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as packed:
        shutil.copyfileobj(raw, packed)
