"""A build, from a labelled output to its shards and manifest.

`build_training_data(spec)` checks the input (`inspect_source`), clears the output
(`prepare_output`), selects each `segments/` shard's rows in turn (`Selector`), writes them to
their split's shards (`ShardWriter`, and the exports of `spec.formats`) and writes
`manifest.json` last: the manifest records the filters, the split rule, the counts (kept,
dropped by reason, per split), every shard with its size and sha256, the schema, the formats,
and the runs and models the rows came from.

With an export that holds audio (lhotse, hf), a kept segment whose source object is gone or
changed since it was labelled is dropped as `source_changed` (`SegmentAudio.changed`) before
it is written, so every format holds the same rows.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.storage import redact_uri, resolve
from pipelines.training_data.audio import SegmentAudio
from pipelines.training_data.exports import AudioExports
from pipelines.training_data.output import (MANIFEST, TOKENS_MEMBER, manifest_uri,
                                            prepare_output, remove_staging)
from pipelines.training_data.selection import (FORMAT_VERSION, SPLIT_RULE, SPLITS, Selector,
                                               split_of)
from pipelines.training_data.shards import ShardWriter, put_bytes
from pipelines.training_data.source import (SourceInfo, inspect_source, read_file_states,
                                            read_segments)
from pipelines.training_data.spec import AUDIO_FORMATS, TrainingDataSpec

log = logging.getLogger(__name__)

FORMAT = "kimi-label-training-data"
LHOTSE_DESCRIPTION = {
    "manifests": "lhotse/recordings_<split>.jsonl.gz, lhotse/supervisions_<split>.jsonl.gz",
    "recordings": "one per segment: its 16 kHz mono FLAC, lhotse/audio/<split>-<n>/<key>.flac",
    "supervisions": "text: transcript; language; custom: <task>, <task>_confidence, "
                    "semantic_tokens, source_uri, segment_index, source_start_s, source_end_s"}
HF_DESCRIPTION = {"shards": "hf/<split>/part-<n>.parquet",
                  "audio": "column audio: datasets.Audio, 16 kHz mono FLAC bytes",
                  "load": 'datasets.load_dataset("parquet", data_dir="<output>/hf")'}


def _with_unchanged_sources(kept: pa.Table, audio: SegmentAudio, select: Selector) -> pa.Table:
    """The kept rows whose source still holds the audio they were labelled from; the others
    are counted as dropped (`source_changed`)."""
    uris = kept["source_uri"].to_pylist()
    changed = audio.changed(dict.fromkeys(uris))
    if not changed:
        return kept
    keep = [u not in changed for u in uris]
    select.dropped["source_changed"] += keep.count(False)
    return kept.filter(pa.array(keep, pa.bool_()))


def _select_and_write(spec: TrainingDataSpec, info: SourceInfo, select: Selector,
                      writer: ShardWriter, audio: SegmentAudio | None
                      ) -> tuple[set[str], set[str]]:
    """Every segments shard's kept rows into their split's shards; the runs and models of the
    kept rows."""
    fs, root = resolve(spec.input, spec.storage_options)
    runs, models = set(), set()
    split_cache: dict[str, str] = {}
    for path in info.segments_shards:
        kept = select(read_segments(fs, path, info.tasks, spec.filters))
        if audio is not None and kept.num_rows:
            kept = _with_unchanged_sources(kept, audio, select)
        if not kept.num_rows:
            continue
        runs.update(r for r in kept["run_id"].to_pylist() if r)
        models.update(m for m in kept["model_id"].to_pylist() if m)
        splits = [split_cache.setdefault(u, split_of(u, spec.validation_fraction,
                                                     spec.split_salt))
                  for u in kept["source_uri"].to_pylist()]
        for split in SPLITS:
            writer.add(split, kept.filter(pa.array([s == split for s in splits])))
    writer.close()
    return runs, models


def _manifest(spec: TrainingDataSpec, info: SourceInfo, select: Selector, writer: ShardWriter,
              runs: set[str], models: set[str]) -> dict[str, Any]:
    """The manifest; its keys keep their first names (`source`, `destination`: the spec's
    `input` and `output`), so existing readers keep working."""
    splits = writer.split_totals()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": redact_uri(spec.input), "destination": redact_uri(spec.output),
        "filters": spec.filters.model_dump(),
        "split": {"by": "source_uri", "validation_fraction": spec.validation_fraction,
                  "salt": spec.split_salt, "rule": SPLIT_RULE},
        "rows_per_shard": spec.rows_per_shard,
        "tasks": info.tasks,
        "counts": {"input_segments": select.input_rows,
                   "kept": sum(st["rows"] for st in splits.values()),
                   "dropped": dict(sorted(select.dropped.items())),
                   "splits": splits},
        "shards": writer.shards,
        "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable}
                   for f in select.schema],
        "formats": spec.formats,
        "webdataset": ({"members": {"json": "every column but semantic_tokens",
                                    TOKENS_MEMBER: "semantic_tokens, int32 numpy array"}}
                       if "webdataset" in spec.formats else None),
        "lhotse": (LHOTSE_DESCRIPTION if "lhotse" in spec.formats else None),
        "hf": (HF_DESCRIPTION if "hf" in spec.formats else None),
        "source_runs": sorted(runs), "model_ids": sorted(models),
    }


def build_training_data(spec: TrainingDataSpec) -> dict[str, Any]:
    """Build the shards and the manifest; returns the manifest (plus `manifest_uri`). Raises
    TrainingDataError for an input or output it refuses (nothing is written then)."""
    info = inspect_source(spec)
    fs, root = resolve(spec.input, spec.storage_options)
    select = Selector(spec.filters, read_file_states(fs, root), info.tasks)
    out_fs, out_root = resolve(spec.output, spec.output_storage())
    prepare_output(out_fs, out_root, spec.output, spec.overwrite)
    audio, exports = None, None
    if AUDIO_FORMATS & set(spec.formats):
        audio = SegmentAudio(spec.storage_options,
                             {uri: etag for uri, (_, etag) in select.files.items()})
        exports = AudioExports(out_fs, out_root, spec.formats, info.tasks, audio)
    writer = ShardWriter(out_fs, out_root, spec.rows_per_shard, "webdataset" in spec.formats,
                         exports)
    runs, models = _select_and_write(spec, info, select, writer, audio)
    remove_staging(out_fs, out_root)
    manifest = _manifest(spec, info, select, writer, runs, models)
    put_bytes(out_fs, out_root, MANIFEST,
              json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    remove_staging(out_fs, out_root)
    log.info("training data: %d of %d segments kept -> %s", manifest["counts"]["kept"],
             select.input_rows, redact_uri(spec.output))
    return {**manifest, "manifest_uri": manifest_uri(spec.output)}
