"""Training shards from a labelled output: segments with their semantic tokens and labels.

    spec = TrainingDataSpec(source="s3://audio/labels", destination="s3://audio/train-v1",
                            filters=TrainingFilters(min_duration_s=1.0,
                                                    min_confidence={"emotion": 0.5}),
                            validation_fraction=0.05, webdataset=True)
    manifest = build_training_data(spec)

Input: the `files/` and `segments/` tables of a `kimi-label run` made with `--semantic-tokens`.
A segment is kept when its file has an ok row in `files/` with the same etag (segments left by a
crash or by an older version of the object are not), it is the first row of its
(source_uri, segment_index), its status is ok, it has tokens, and it passes the filters. Each
dropped row is counted under the first rule it fails (`DROP_REASONS` order).

Split: by source file. A file goes to validation when the first 64 bits of
sha256(split_salt + NUL + source_uri), as a fraction of 2**64, fall below `validation_fraction`:
the same input always gives the same split, and no file has segments in both splits.

Output under the destination (rows in input order, at most `rows_per_shard` per shard):

    train/part-00000.parquet ...        validation/part-00000.parquet ...
    webdataset/train-000000.tar ...     webdataset/validation-000000.tar ...  (webdataset=True)
    manifest.json                       written last: its presence marks a complete build

The tars hold the same rows as the Parquet shard of the same number: per sample `<key>.json`
(every column but the tokens) and `<key>.tokens.npy` (int32, numpy format); keys are
`<24 hex of sha256(source_uri)>-<segment_index, 6 digits>`, unique and free of dots and slashes.
Every object is staged under `<destination>/_staging/` and moved into place. A build into a
destination without a manifest (an interrupted earlier attempt) first removes that attempt's
shards; a destination with a manifest needs `overwrite=True`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

FORMAT = "kimi-label-training-data"
FORMAT_VERSION = "1"
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
OUTPUT_DIRS = ("train", "validation", "webdataset")
TOKENS_MEMBER = "tokens.npy"
TAR_MTIME = 0  # fixed member metadata: the same rows always give the same tar bytes

# the order in which rules are checked; a dropped row counts under the first it fails
DROP_REASONS = ("not_in_files", "duplicate", "error", "silent", "no_semantic_tokens",
                "truncated", "looped", "too_short", "too_long", "empty_transcript")
# + "low_confidence:<task>" per task of `min_confidence`, last


class TrainingDataError(Exception):
    """The build cannot run: not a labelled output, no semantic tokens, bad filters, a
    destination that already holds a build."""


class TrainingFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    drop_truncated: bool = True  # transcript hit the token budget
    drop_looped: bool = True  # transcript ended in a repetition loop
    min_duration_s: float = Field(0.0, ge=0)
    max_duration_s: float | None = Field(None, gt=0)
    min_confidence: dict[str, float] = Field(
        default_factory=dict, description="closed-set task -> minimum top probability")
    require_transcript: bool = False  # drop segments whose transcript is null or blank

    @model_validator(mode="after")
    def _check(self) -> TrainingFilters:
        if self.max_duration_s is not None and self.max_duration_s < self.min_duration_s:
            raise ValueError(f"max_duration_s {self.max_duration_s} < min_duration_s "
                             f"{self.min_duration_s}")
        for name, value in self.min_confidence.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"min_confidence[{name!r}] = {value} is not in [0, 1]")
        return self


class TrainingDataOptions(BaseModel):
    """What to build, without where the credentials come from (the flow's parameters)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="a labelled output: the URI holding files/ and segments/")
    destination: str = Field(description="where the shards and manifest.json go")
    filters: TrainingFilters = Field(default_factory=TrainingFilters)
    validation_fraction: float = Field(0.05, ge=0.0, le=1.0, allow_inf_nan=False)
    split_salt: str = ""
    rows_per_shard: int = Field(10_000, ge=1)
    webdataset: bool = False
    overwrite: bool = False


class TrainingDataSpec(TrainingDataOptions):
    storage_options: dict[str, Any] | None = None  # for both sides unless destination_options
    destination_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _distinct(self) -> TrainingDataSpec:
        source, dest = self.source.rstrip("/"), self.destination.rstrip("/")
        if dest == source or any(dest == f"{source}/{t}" or dest.startswith(f"{source}/{t}/")
                                 for t in ("files", "segments")):
            raise ValueError("destination must differ from the source output and lie outside "
                             "its files/ and segments/")
        return self

    def dest_options(self) -> dict[str, Any] | None:
        return self.destination_options if self.destination_options is not None \
            else self.storage_options


# -- pure helpers ----------------------------------------------------------------------------

def split_of(source_uri: str, validation_fraction: float, salt: str = "") -> str:
    """'train' or 'validation' for every segment of `source_uri`; deterministic."""
    digest = hashlib.sha256(f"{salt}\0{source_uri}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") < validation_fraction * 2 ** 64 \
        else "train"


def sample_key(source_uri: str, segment_index: int) -> str:
    return f"{hashlib.sha256(source_uri.encode()).hexdigest()[:24]}-{int(segment_index):06d}"


def closed_set_tasks(schema: pa.Schema) -> list[str]:
    """Tasks with a `<name>` label column and a `<name>_scores` map column."""
    names = set(schema.names)
    return [f.name[: -len("_scores")] for f in schema
            if f.name.endswith("_scores") and pa.types.is_map(f.type)
            and f.name[: -len("_scores")] in names]


def output_schema(tasks: list[str]) -> pa.Schema:
    fields = [pa.field("key", pa.string(), nullable=False),
              pa.field("source_uri", pa.string(), nullable=False),
              pa.field("segment_index", pa.int32(), nullable=False),
              pa.field("start_s", pa.float64(), nullable=False),
              pa.field("end_s", pa.float64(), nullable=False),
              pa.field("duration_s", pa.float64(), nullable=False),
              pa.field("num_tokens", pa.int32(), nullable=False),
              pa.field("semantic_tokens", pa.list_(pa.int32()), nullable=False),
              pa.field("transcript", pa.string())]
    for name in tasks:
        fields += [pa.field(name, pa.string()), pa.field(f"{name}_confidence", pa.float32())]
    fields += [pa.field("model_id", pa.string()), pa.field("run_id", pa.string())]
    return pa.schema(fields, metadata={b"kimi_label.table": b"training",
                                       b"kimi_label.training_format": FORMAT_VERSION.encode()})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put_atomic(fs, root: str, relative: str, data: bytes) -> None:
    """Bytes already serialized (so the sha256 in the manifest is that of exactly what was
    uploaded), staged and moved into place, retried while the store is unavailable."""
    from pipelines.storage import write_atomic

    write_atomic(fs, root, relative, lambda handle: handle.write(data))


def _read_shard(fs, path: str, tasks) -> pa.Table:
    """The columns the build needs from one `segments/` shard, retried while unavailable."""
    from pipelines.storage import retrying

    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            shard = pq.ParquetFile(handle)
            return shard.read(columns=[c for c in shard.schema_arrow.names
                                       if c in _wanted(tasks)])

    return retrying(read, path, action="read")


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def webdataset_bytes(table: pa.Table) -> bytes:
    """One tar: per row `<key>.json` then `<key>.tokens.npy`, adjacent as WebDataset wants."""
    import numpy as np

    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in table.to_pylist():
            tokens = np.asarray(row.pop("semantic_tokens"), dtype=np.int32)
            npy = io.BytesIO()
            np.save(npy, tokens, allow_pickle=False)
            members = ((f"{row['key']}.json",
                        json.dumps(row, ensure_ascii=False, sort_keys=True).encode()),
                       (f"{row['key']}.{TOKENS_MEMBER}", npy.getvalue()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


# -- reading the source ----------------------------------------------------------------------

class SourceInfo(BaseModel):
    files_shards: int
    segments_shards: list[str]
    tasks: list[str]  # closed-set tasks found in the segments
    has_transcript: bool
    shards_without_tokens: int


def _parquet_files(fs, folder: str) -> list[str]:
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.find(folder) if p.endswith(".parquet"))


def inspect_source(spec: TrainingDataSpec) -> SourceInfo:
    """The checks that need only the Parquet footers: a labelled output with semantic tokens,
    and filters that name columns it has. Raises TrainingDataError."""
    from pipelines.storage import StorageError, redact_uri, resolve

    uri = redact_uri(spec.source)
    try:
        fs, root = resolve(spec.source, spec.storage_options)
        files = _parquet_files(fs, f"{root}/files")
        segments = _parquet_files(fs, f"{root}/segments")
        schemas = []
        for path in segments:
            with fs.open(path, "rb") as handle:
                schemas.append(pq.ParquetFile(handle).schema_arrow)
    except StorageError as exc:
        raise TrainingDataError(f"source: {exc}") from None
    if not files or not segments:
        raise TrainingDataError(f"{uri} is not a labelled output: no Parquet shards under "
                                f"{'files/' if not files else 'segments/'}")
    with_tokens = [s for s in schemas if "semantic_tokens" in s.names]
    if not with_tokens:
        raise TrainingDataError(f"{uri}: the segments have no semantic_tokens column; label "
                                "with `kimi-label run --semantic-tokens` (semantic_tokens=True)")
    tasks: list[str] = []
    for schema in schemas:
        tasks += [t for t in closed_set_tasks(schema) if t not in tasks]
    unknown = sorted(set(spec.filters.min_confidence) - set(tasks))
    if unknown:
        raise TrainingDataError(f"min_confidence names {unknown}, not closed-set tasks of "
                                f"{uri} (it has {tasks or 'none'})")
    has_transcript = any("transcript" in s.names for s in schemas)
    if spec.filters.require_transcript and not has_transcript:
        raise TrainingDataError(f"require_transcript: {uri} has no transcript column (no asr "
                                "task)")
    return SourceInfo(files_shards=len(files), segments_shards=segments, tasks=tasks,
                      has_transcript=has_transcript,
                      shards_without_tokens=len(schemas) - len(with_tokens))


def _read_files(fs, root: str) -> dict[str, tuple[str, str | None]]:
    from pipelines.storage import read_table_dir

    out: dict[str, tuple[str, str | None]] = {}
    for _, table in read_table_dir(fs, f"{root}/files", ["source_uri", "status", "etag"]):
        for uri, status, etag in zip(table["source_uri"].to_pylist(),
                                     table["status"].to_pylist(), table["etag"].to_pylist()):
            out[uri] = (status, etag)
    return out


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name in table.column_names:
        return table[name].combine_chunks().cast(type_)
    return pa.nulls(table.num_rows, type_)


def _top_probability(scores: pa.ChunkedArray | None, n: int) -> pa.Array:
    if scores is None:
        return pa.nulls(n, pa.float32())
    return pa.array([max(v for _, v in m) if m else None for m in scores.to_pylist()],
                    pa.float32())


def _wanted(tasks: list[str]) -> set[str]:
    return {"source_uri", "segment_index", "start_s", "end_s", "status", "etag", "model_id",
            "run_id", "semantic_tokens", "transcript", "transcript_truncated",
            "transcript_looped", *tasks, *(f"{t}_scores" for t in tasks)}


# -- the build -------------------------------------------------------------------------------

class _Selector:
    """Applies the rules to one segments shard at a time; keeps counts and seen keys."""

    def __init__(self, spec: TrainingDataSpec, files: dict, tasks: list[str]):
        self.spec, self.files, self.tasks = spec, files, tasks
        self.seen: set[tuple[str, int]] = set()
        self.dropped: Counter = Counter()
        self.input_rows = 0
        self.schema = output_schema(tasks)

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        self.input_rows += n
        f = self.spec.filters
        uris = table["source_uri"].to_pylist()
        indices = table["segment_index"].to_pylist()
        etags = _column(table, "etag", pa.string()).to_pylist()
        not_in_files, duplicate, file_error = [], [], []
        for uri, index, etag in zip(uris, indices, etags):
            status, file_etag = self.files.get(uri, (None, None))
            missing = status is None or (etag is not None and file_etag is not None
                                         and etag != file_etag)
            not_in_files.append(missing)
            file_error.append(status not in (None, "ok"))
            duplicate.append(not missing and (uri, index) in self.seen)
            if not missing:
                self.seen.add((uri, index))
        status = table["status"].combine_chunks()
        duration = pc.subtract(table["end_s"].combine_chunks(), table["start_s"].combine_chunks())
        tokens = _column(table, "semantic_tokens", pa.list_(pa.int32()))
        transcript = _column(table, "transcript", pa.string())
        confidence = {t: _top_probability(table[f"{t}_scores"]
                                          if f"{t}_scores" in table.column_names else None, n)
                      for t in self.tasks}

        def false():
            return pa.array([False] * n, pa.bool_())

        rules: list[tuple[str, Any]] = [
            ("not_in_files", pa.array(not_in_files, pa.bool_())),
            ("duplicate", pa.array(duplicate, pa.bool_())),
            ("error", pc.or_(pa.array(file_error, pa.bool_()), pc.equal(status, "error"))),
            ("silent", pc.not_equal(status, "ok")),  # silent, or any status but ok/error
            ("no_semantic_tokens", pc.or_kleene(pc.is_null(tokens),
                                                pc.equal(pc.list_value_length(tokens), 0))),
            ("truncated", _column(table, "transcript_truncated", pa.bool_())
             if f.drop_truncated else false()),
            ("looped", _column(table, "transcript_looped", pa.bool_())
             if f.drop_looped else false()),
            ("too_short", pc.less(duration, f.min_duration_s)),
            ("too_long", pc.greater(duration, f.max_duration_s)
             if f.max_duration_s is not None else false()),
            ("empty_transcript", pc.equal(pc.utf8_trim_whitespace(pc.fill_null(transcript, "")),
                                          "") if f.require_transcript else false()),
            *((f"low_confidence:{t}", pc.less(pc.fill_null(confidence[t], -1.0), minimum))
              for t, minimum in f.min_confidence.items()),
        ]
        keep = pa.array([True] * n, pa.bool_())
        for reason, hit in rules:
            hit = pc.and_(keep, pc.fill_null(hit, False))
            count = pc.sum(hit).as_py() or 0
            if count:
                self.dropped[reason] += count
            keep = pc.and_not(keep, hit)

        kept_uris = [u for u, k in zip(uris, keep.to_pylist()) if k]
        kept_idx = [i for i, k in zip(indices, keep.to_pylist()) if k]
        columns = {
            "key": pa.array([sample_key(u, i) for u, i in zip(kept_uris, kept_idx)], pa.string()),
            "source_uri": pa.array(kept_uris, pa.string()),
            "segment_index": pa.array(kept_idx, pa.int32()),
            "start_s": table["start_s"].combine_chunks().filter(keep),
            "end_s": table["end_s"].combine_chunks().filter(keep),
            "duration_s": duration.filter(keep),
            "num_tokens": pc.list_value_length(tokens).filter(keep).cast(pa.int32()),
            "semantic_tokens": tokens.filter(keep),
            "transcript": transcript.filter(keep),
        }
        for t in self.tasks:
            columns[t] = _column(table, t, pa.string()).filter(keep)
            columns[f"{t}_confidence"] = confidence[t].filter(keep)
        columns["model_id"] = _column(table, "model_id", pa.string()).filter(keep)
        columns["run_id"] = _column(table, "run_id", pa.string()).filter(keep)
        return pa.Table.from_pydict(columns, schema=self.schema)


class _ShardWriter:
    """Buffers kept rows per split and writes `rows_per_shard`-row shards as they fill."""

    def __init__(self, spec: TrainingDataSpec, fs, root: str, schema: pa.Schema):
        self.spec, self.fs, self.root, self.schema = spec, fs, root, schema
        self.buffers: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.shards: list[dict[str, Any]] = []
        self.number = dict.fromkeys(SPLITS, 0)
        self.stats = {s: {"rows": 0, "source_files": set(), "duration_s": 0.0, "tokens": 0}
                      for s in SPLITS}

    def add(self, split: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.buffers[split].append(table)
        self.buffered[split] += table.num_rows
        while self.buffered[split] >= self.spec.rows_per_shard:
            self._flush(split, self.spec.rows_per_shard)

    def close(self) -> None:
        for split in SPLITS:
            if self.buffered[split]:
                self._flush(split, self.buffered[split])

    def _flush(self, split: str, rows: int) -> None:
        whole = pa.concat_tables(self.buffers[split])
        shard, rest = whole.slice(0, rows).combine_chunks(), whole.slice(rows)
        self.buffers[split] = [rest] if rest.num_rows else []
        self.buffered[split] = rest.num_rows
        number = self.number[split]
        self.number[split] += 1
        outputs = [(f"{split}/part-{number:05d}.parquet", "parquet", parquet_bytes)]
        if self.spec.webdataset:
            outputs.append((f"webdataset/{split}-{number:06d}.tar", "webdataset",
                            webdataset_bytes))
        for relative, fmt, serialize in outputs:
            data = serialize(shard)
            _put_atomic(self.fs, self.root, relative, data)
            self.shards.append({"path": relative, "split": split, "format": fmt,
                                "rows": shard.num_rows, "bytes": len(data),
                                "sha256": _sha256(data)})
        stats = self.stats[split]
        stats["rows"] += shard.num_rows
        stats["source_files"].update(shard["source_uri"].to_pylist())
        stats["duration_s"] += pc.sum(shard["duration_s"]).as_py() or 0.0
        stats["tokens"] += pc.sum(shard["num_tokens"]).as_py() or 0


_OURS = re.compile(r"^(train|validation)/part-\d{5}\.parquet$"
                   r"|^webdataset/(train|validation)-\d{6}\.tar$")


def _prepare_destination(spec: TrainingDataSpec, fs, root: str) -> None:
    """Clear what an earlier build (with overwrite=True) or an interrupted one (no manifest)
    left; anything else in train/, validation/ or webdataset/ is not ours and stops the build."""
    from pipelines.storage import redact_uri

    dest = redact_uri(spec.destination)
    if fs.exists(f"{root}/{MANIFEST}") and not spec.overwrite:
        raise TrainingDataError(f"{dest} already holds a build ({MANIFEST}); pass "
                                "overwrite=True to replace it")
    ours, foreign = [], []
    for name in OUTPUT_DIRS:
        if fs.exists(f"{root}/{name}"):
            for path in fs.find(f"{root}/{name}"):
                (ours if _OURS.match(path[len(root) + 1:]) else foreign).append(path)
    if foreign:
        raise TrainingDataError(f"{dest} holds files that are not training shards, e.g. "
                                f"{foreign[0][len(root) + 1:]}; choose an empty destination")
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # first: shards without a manifest are an unfinished build
    for path in ours:
        fs.rm(path)
    if fs.exists(f"{root}/_staging"):
        fs.rm(f"{root}/_staging", recursive=True)
    fs.makedirs(root, exist_ok=True)


def build_training_data(spec: TrainingDataSpec) -> dict[str, Any]:
    """Build the shards and the manifest; returns the manifest (plus `manifest_uri`)."""
    from pipelines.storage import redact_uri, resolve

    info = inspect_source(spec)
    fs, root = resolve(spec.source, spec.storage_options)
    files = _read_files(fs, root)
    dest_fs, dest_root = resolve(spec.destination, spec.dest_options())
    _prepare_destination(spec, dest_fs, dest_root)

    select = _Selector(spec, files, info.tasks)
    writer = _ShardWriter(spec, dest_fs, dest_root, select.schema)
    runs, models = set(), set()
    split_cache: dict[str, str] = {}
    for path in info.segments_shards:
        kept = select(_read_shard(fs, path, info.tasks))
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
    try:
        dest_fs.rm(f"{dest_root}/_staging", recursive=True)
    except (FileNotFoundError, OSError):
        pass

    splits_out = {s: {"rows": st["rows"], "source_files": len(st["source_files"]),
                      "duration_s": round(st["duration_s"], 3), "tokens": st["tokens"]}
                  for s, st in writer.stats.items()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": redact_uri(spec.source), "destination": redact_uri(spec.destination),
        "filters": spec.filters.model_dump(),
        "split": {"by": "source_uri", "validation_fraction": spec.validation_fraction,
                  "salt": spec.split_salt,
                  "rule": "validation iff int(sha256(salt + '\\0' + source_uri)[:8 bytes]) "
                          "< validation_fraction * 2**64"},
        "rows_per_shard": spec.rows_per_shard,
        "tasks": info.tasks,
        "counts": {"input_segments": select.input_rows,
                   "kept": sum(st["rows"] for st in splits_out.values()),
                   "dropped": dict(sorted(select.dropped.items())),
                   "splits": splits_out},
        "shards": writer.shards,
        "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable}
                   for f in select.schema],
        "webdataset": ({"members": {"json": "every column but semantic_tokens",
                                    TOKENS_MEMBER: "semantic_tokens, int32 numpy array"}}
                       if spec.webdataset else None),
        "source_runs": sorted(runs), "model_ids": sorted(models),
    }
    _put_atomic(dest_fs, dest_root, MANIFEST,
                json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    try:
        dest_fs.rm(f"{dest_root}/_staging", recursive=True)
    except (FileNotFoundError, OSError):
        pass
    log.info("training data: %d of %d segments kept -> %s", manifest["counts"]["kept"],
             select.input_rows, redact_uri(spec.destination))
    return {**manifest, "manifest_uri": f"{spec.destination.rstrip('/')}/{MANIFEST}"}
