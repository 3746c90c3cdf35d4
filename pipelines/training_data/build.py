"""A build, from a labelled output to its shards and manifest.

`build_training_data(spec)` checks the input (`inspect_source`), clears the output
(`prepare_output`), selects each `segments/` shard's rows in turn (`Selector`), writes them to
their split's shards (`ShardWriter`) and writes `manifest.json` last: the manifest records the
filters, the split rule, the counts (kept, dropped by reason, per split), every shard with its
size and sha256, the schema, and the runs and models the rows came from.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from pipelines.storage import redact_uri, resolve
from pipelines.training_data.output import (MANIFEST, TOKENS_MEMBER, manifest_uri,
                                            prepare_output, remove_staging)
from pipelines.training_data.selection import (FORMAT_VERSION, SPLIT_RULE, SPLITS, Selector,
                                               split_of)
from pipelines.training_data.shards import ShardWriter, put_bytes
from pipelines.training_data.source import (SourceInfo, inspect_source, read_file_states,
                                            read_segments)
from pipelines.training_data.spec import TrainingDataSpec

log = logging.getLogger(__name__)

FORMAT = "kimi-label-training-data"


def _select_and_write(spec: TrainingDataSpec, info: SourceInfo, select: Selector,
                      writer: ShardWriter) -> tuple[set[str], set[str]]:
    """Every segments shard's kept rows into their split's shards; the runs and models of the
    kept rows."""
    fs, root = resolve(spec.input, spec.storage_options)
    runs, models = set(), set()
    split_cache: dict[str, str] = {}
    for path in info.segments_shards:
        kept = select(read_segments(fs, path, info.tasks))
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
        "webdataset": ({"members": {"json": "every column but semantic_tokens",
                                    TOKENS_MEMBER: "semantic_tokens, int32 numpy array"}}
                       if spec.webdataset else None),
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
    writer = ShardWriter(out_fs, out_root, spec.rows_per_shard, spec.webdataset)
    runs, models = _select_and_write(spec, info, select, writer)
    remove_staging(out_fs, out_root)
    manifest = _manifest(spec, info, select, writer, runs, models)
    put_bytes(out_fs, out_root, MANIFEST,
              json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    remove_staging(out_fs, out_root)
    log.info("training data: %d of %d segments kept -> %s", manifest["counts"]["kept"],
             select.input_rows, redact_uri(spec.output))
    return {**manifest, "manifest_uri": manifest_uri(spec.output)}
