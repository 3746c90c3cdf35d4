"""The Ray Data stages of a labelling job. Each is a plain callable over a pyarrow batch; the job
(`pipelines.job`) decides how it is scheduled. A stage owns columns and error bookkeeping; the
model lives behind `kimi_ops` and returns one result per input, in order.

Rows flow one per input object, so a file's segments stay together, except that a long one
travels as several *pieces* (consecutive segments, at most `piece_seconds` of audio each):

  plan rows (uri, size, etag)
  -> DecodeStage    fetch, decode, resample, segment, cut pieces (CPU tasks)
  -> FrontendStage  VQ tokens + Whisper features per segment     (actor, GPU when present)
  -> LabelStage     tasks over every segment, file row stitched  (actor, GPU when present)
  -> WriteStage     typed Parquet shards: segments/ then files/  (CPU tasks)
  -> the driver     stitches a long file's pieces and writes its shards (`PieceStitcher`)

A row's waveform and then its features are single objects, which the stages batch by row count:
without pieces one multi-hour archive (1.4 GB of waveform for 6 h, 2.8 GB of the full model's
features) or a batch of hour-long files would set the workers' memory, whatever the in-flight
budget, and one long recording would keep one actor busy while the others idle (Ray Data cuts
the decode task's output into blocks of about 128 MiB, each a separate actor call).

A file that cannot be used becomes an error row at the stage that finds out, carrying a stable
`error_kind`, and flows on to the writer like any other row. Engine failures are not caught:
they kill the worker and Ray retries it. The exception is a file that does not fit the device's
memory even alone: an `out_of_memory` error row (`LabelStage._label`). A store that stays
unavailable past the job's retry budget is not a property of the file either: that
StorageError ends the run (a rerun resumes).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

SEGMENT_KEYS = ("start", "end", "silent")
OUT_OF_MEMORY = "out_of_memory"  # the error kind of a file the device cannot label (LabelStage)
PIECE_SECONDS = 300.0  # a long file's pieces: at most this much audio each (JobSpec.piece_seconds)


def _error(row: dict[str, Any], kind: str, message: str) -> dict[str, Any]:
    row.update(error_kind=kind, error_message=message)
    return row


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`). A front-end batch
    allocates and frees hundreds of MB of differently sized buffers; glibc keeps freed heap
    memory, fragmented, so an actor's footprint would creep up over a long corpus."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads in this actor (None: what Ray set, its whole CPUs, at least 1)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def generation_settings(tasks, max_new_tokens: int, task_params: dict) -> dict[str, Any]:
    """What shaped the labels besides the model and the tasks (the token budget, greedy text,
    the tasks' own sampling, and the task parameters a task of the run takes, such as asr's
    language): the
    segments' `generation` column holds it as JSON, `pipelines.job.check_output_settings`
    compares it."""
    from kimi_ops.tasks import TASKS, task_parameters

    used = set().union(*(task_parameters(t.name) for t in tasks if t.name in TASKS))
    return {"max_new_tokens": max_new_tokens, "text_temperature": 0.0,
            # only what a task of this run takes: `--question` means nothing to `asr`
            **{k: v for k, v in task_params.items() if v is not None and k in used},
            **{t.name: t.sampling for t in tasks if hasattr(t, "sampling") and t.sampling}}


class PlanReader:
    """Work units (plan shard path, start, stop) -> those rows of the shard (uri, size, etag)."""

    def __init__(self, output: str, storage_options: dict | None, retry=None):
        self.output = output
        self.storage_options = storage_options
        self.retry = retry  # a pipelines.storage.RetryPolicy; None: the default

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.job import read_parquet
        from pipelines.storage import resolve

        fs, _ = resolve(self.output, self.storage_options)
        return pa.concat_tables([
            read_parquet(fs, unit["plan_shard"], None, self.retry).slice(
                unit["start"], unit["stop"] - unit["start"])
            for unit in batch.to_pylist()])


class DecodeStage:
    """Fetch each object, decode to 16 kHz mono, cut into <= 30 s segments at pauses, and
    emit the file as one row, or as pieces of at most `piece_seconds` of whole segments."""

    def __init__(self, storage_options: dict | None, max_segment_seconds: float = 30.0,
                 retry=None, max_audio_seconds: float | None = None,
                 piece_seconds: float = PIECE_SECONDS, spool_bytes: int | None = None):
        from pipelines.storage import SPOOL_BYTES

        self.storage_options = storage_options
        # objects over this many bytes are decoded from a local copy (None: storage's default)
        self.spool_bytes = SPOOL_BYTES if spool_bytes is None else spool_bytes
        self.max_segment_seconds = max_segment_seconds
        self.piece_seconds = piece_seconds
        # None: the decoder's default (KIMI_MAX_AUDIO_SECONDS, else 6 h)
        self.limit = {"max_seconds": max_audio_seconds} if max_audio_seconds else {}
        self.retry = retry  # a pipelines.storage.RetryPolicy; None: the default

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """One table per object, yielded as it is decoded: Ray Data stores each before the
        next object is fetched, so a task holds one object's waveform at a time."""
        for plan in batch.to_pylist():
            yield self.decode(plan)

    def decode(self, plan: dict) -> pa.Table:
        """One object's rows: an error row, or its pieces (one for most files). The pieces'
        `audio` values are views of the one waveform buffer, not copies."""
        import soundfile as sf

        from kimi_ops.audio import SAMPLE_RATE, load_audio
        from kimi_ops.audio.decode import audio_file
        from kimi_ops.audio.segment import segment_audio
        from kimi_ops.errors import AudioTooLongError, KimiError
        from pipelines.job import work_units
        from pipelines.storage import StorageError, fetched

        row = {"source_uri": plan["uri"], "etag": plan.get("etag"),
               "size_bytes": plan.get("size"), "error_kind": None, "error_message": None,
               "sample_rate": None, "channels": None, "duration_s": None,
               "segments": None, "audio": None, "decode_s": 0.0,
               "piece": 0, "pieces": 1, "first_segment": 0, "offset": 0}
        start = time.perf_counter()
        try:
            # bytes, or for a large object a local file, which the decoder reads block by block
            with fetched(plan["uri"], self.storage_options, retry=self.retry,
                         size=plan.get("size"), spool_bytes=self.spool_bytes) as (data, size):
                row["size_bytes"] = size
                try:
                    with audio_file(data) as handle:  # (not by path: see audio_file)
                        info = sf.info(handle)
                    row["sample_rate"], row["channels"] = int(info.samplerate), int(info.channels)
                except (RuntimeError, OSError, sf.LibsndfileError):
                    pass  # load_audio reports it with the file name
                wave = load_audio(data, name=plan["uri"], **self.limit)
            segments = segment_audio(wave, SAMPLE_RATE, max_seconds=self.max_segment_seconds)
            row["duration_s"] = len(wave) / SAMPLE_RATE
        except StorageError as exc:
            if exc.retryable:  # the store, not the file: end the run, do not label it
                raise
            _error(row, exc.kind, f"{exc.uri}: {exc.reason}")  # as audio errors: no kind
        except AudioTooLongError as exc:  # the job's own knob, and the duration for a rerun
            row["duration_s"] = exc.seconds
            _error(row, exc.kind, f"{plan['uri']}: {exc.seconds:.0f} s is longer than the "
                                  f"{exc.limit:.0f} s limit (max_audio_seconds, "
                                  "--max-audio-seconds; a rerun with a higher limit labels it)")
        except KimiError as exc:
            _error(row, exc.kind, str(exc))
        row["decode_s"] = time.perf_counter() - start
        if row["error_kind"] is not None:
            return pa.Table.from_pylist([row], schema=DECODED_SCHEMA)
        # runs of consecutive segments of at most `piece_seconds` (a file has >= 1 segment);
        # the segments cover the waveform, so the pieces split it without gaps
        cuts = work_units([s.end - s.start for s in segments], len(segments),
                          int(self.piece_seconds * SAMPLE_RATE))
        rows = [{**row, "piece": piece, "pieces": len(cuts), "first_segment": first,
                 "offset": segments[first].start, "decode_s": row["decode_s"] / len(cuts),
                 "segments": [{"start": s.start, "end": s.end, "silent": s.silent}
                              for s in segments[first:stop]]}
                for piece, (first, stop) in enumerate(cuts)]
        bounds = np.array([r["offset"] for r in rows] + [len(wave)], dtype=np.int64)
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        audio = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(rows),
            [None, pa.py_buffer(bounds * wave.itemsize), pa.py_buffer(wave)])
        table = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
        return table.set_column(table.schema.get_field_index("audio"), "audio", audio)


DECODED_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("etag", pa.string()), ("size_bytes", pa.int64()),
    ("error_kind", pa.string()), ("error_message", pa.string()),
    ("sample_rate", pa.int32()), ("channels", pa.int32()), ("duration_s", pa.float64()),
    ("segments", pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()),
                                     ("silent", pa.bool_())]))),
    ("audio", pa.large_binary()), ("decode_s", pa.float64()),
    # which piece of its file the row is, and where it starts: its first segment's index in
    # the file and its first sample (its segments' start/end are sample offsets in the file)
    ("piece", pa.int32()), ("pieces", pa.int32()), ("first_segment", pa.int32()),
    ("offset", pa.int64()),
])


def features_to_bytes(features) -> tuple[bytes, str]:
    """A CPU feature tensor's raw bytes in its own dtype, and that dtype's name."""
    import torch

    name = str(features.dtype).removeprefix("torch.")
    data = features.cpu().contiguous()
    if features.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 16 bits as int16
        data = data.view(torch.int16)
    return data.numpy().tobytes(), name


def features_from_bytes(data: bytes, dtype: str, rows: int):
    """`features_to_bytes`' inverse: a [rows, dim] tensor of `dtype`."""
    import torch

    array = np.frombuffer(data, dtype=np.int16 if dtype == "bfloat16" else np.dtype(dtype))
    tensor = torch.from_numpy(array.reshape(rows, len(array) // max(rows, 1)).copy())
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class FrontendStage:
    """Actor: GLM-4 VQ tokens and Whisper features for every segment of every file in a batch,
    in one front-end call. The waveform column is dropped here."""

    def __init__(self, model: str, glm_tokenizer: str | None, device: str | None,
                 threads: int | None = None):
        import torch

        from kimi_ops.engine.api import default_device, default_dtype
        from kimi_ops.frontend import AudioFrontend
        from kimi_ops.model.checkpoint import resolve_checkpoint

        set_threads(threads)
        paths = resolve_checkpoint(model, glm_tokenizer)
        dev = torch.device(device) if device else default_device()
        self.frontend = AudioFrontend.from_checkpoint(paths.root, glm_dir=paths.glm, device=dev,
                                                      dtype=default_dtype(dev))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kimi_ops.engine.api import halve_on_oom

        start = time.perf_counter()
        rows = batch.to_pylist()
        clips, owners = [], []
        for r, row in enumerate(rows):
            if row["error_kind"] is not None:
                continue
            wave, offset = np.frombuffer(row["audio"], dtype=np.float32), row["offset"]
            for seg in row["segments"]:
                clips.append(wave[seg["start"] - offset: seg["end"] - offset])
                owners.append(r)
        # features in the encoder's own dtype: from a bf16 GPU encoder half the bytes of fp32
        # through the object store, and the label model casts them to bf16 anyway
        encodings = halve_on_oom(lambda c: self.frontend.encode(c, features_dtype=None), clips,
                                 "audio front-end") if clips else []
        tokens: list[list] = [[] for _ in rows]
        features: list[list] = [[] for _ in rows]
        dtypes: list[str | None] = [None] * len(rows)
        for r, enc in zip(owners, encodings):
            tokens[r].append(enc.tokens.astype(np.int32).tolist())
            data, dtypes[r] = features_to_bytes(enc.features)
            features[r].append(data)
        elapsed = time.perf_counter() - start
        out = batch.drop_columns(["audio"])
        out = out.append_column("tokens", pa.array(tokens, pa.list_(pa.list_(pa.int32()))))
        out = out.append_column("features", pa.array(features, pa.list_(pa.large_binary())))
        out = out.append_column("features_dtype", pa.array(dtypes, pa.string()))
        release_free_memory()
        return out.append_column("frontend_s", pa.array([elapsed / max(len(rows), 1)] * len(rows),
                                                        pa.float64()))


class LabelStage:
    """Actor: every selected task over every segment of the batch in one engine pass; builds
    the file's row (transcript stitched in order) and the segment rows, as JSON for the writer."""

    def __init__(self, model: str, glm_tokenizer: str | None, device: str | None,
                 task_specs: list[str], task_params: dict, max_new_tokens: int,
                 semantic_tokens: bool, model_id: str, run_id: str, threads: int | None = None):
        import torch

        from kimi_ops.engine.api import KimiAudio
        from kimi_ops.tasks import get_task

        set_threads(threads)
        self.engine = KimiAudio(model, device=torch.device(device) if device else None,
                                glm_tokenizer=glm_tokenizer, load_frontend=False)
        self.tasks = [get_task(spec, **task_params) for spec in task_specs]
        self.max_new_tokens = max_new_tokens
        self.semantic_tokens = semantic_tokens
        self.model_id = model_id
        self.run_id = run_id
        self.versions = {t.name: t.version for t in self.tasks}
        self.generation = json.dumps(generation_settings(self.tasks, max_new_tokens,
                                                         task_params), sort_keys=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kimi_ops.frontend import AudioEncoding

        start = time.perf_counter()
        rows = batch.to_pylist()
        encodings, silent, owners = [], [], []
        for r, row in enumerate(rows):
            if row["error_kind"] is not None:
                continue
            for seg, toks, feats in zip(row["segments"], row["tokens"], row["features"]):
                encodings.append(AudioEncoding(np.asarray(toks, dtype=np.int64),
                                               features_from_bytes(feats, row["features_dtype"],
                                                                   len(toks))))
                silent.append(bool(seg["silent"]))
                owners.append(r)
        fields = self._label(rows, encodings, silent, owners) if encodings else []
        elapsed = time.perf_counter() - start
        files_json, segments_json = [], []
        for r, row in enumerate(rows):
            mine = [i for i, o in enumerate(owners) if o == r]
            file_row, seg_rows = self._rows(row, [fields[i] for i in mine],
                                            [encodings[i] for i in mine])
            files_json.append(json.dumps(file_row))
            segments_json.append(json.dumps(seg_rows))
        return pa.table({
            "source_uri": batch["source_uri"], "etag": batch["etag"],
            "piece": batch["piece"], "pieces": batch["pieces"],
            "files_json": pa.array(files_json, pa.large_string()),
            "segments_json": pa.array(segments_json, pa.large_string()),
            "decode_s": batch["decode_s"], "frontend_s": batch["frontend_s"],
            "label_s": pa.array([elapsed / max(len(rows), 1)] * len(rows), pa.float64()),
        })

    def _label(self, rows: list[dict], encodings: list, silent: list[bool], owners: list[int]
               ) -> list[dict]:
        """Task fields per segment. The engine already halves a batch that runs out of device
        memory (`kimi_ops.engine.api.halve_on_oom`) and raises only when one prompt alone does
        not fit: the batch is then labelled file by file, and a file that does not fit becomes
        an `out_of_memory` error row (a property of that file; retrying the batch would fail
        the same way) while the others are labelled."""
        import torch

        from kimi_ops.engine.api import oom_reason
        from kimi_ops.tasks.runner import label_segments

        try:
            return label_segments(self.engine, encodings, self.tasks, self.max_new_tokens, silent)
        except torch.OutOfMemoryError:
            pass
        fields: list[dict] = [{} for _ in encodings]
        for r in sorted(set(owners)):
            mine = [i for i, o in enumerate(owners) if o == r]
            try:
                part = label_segments(self.engine, [encodings[i] for i in mine], self.tasks,
                                      self.max_new_tokens, [silent[i] for i in mine])
            except torch.OutOfMemoryError as exc:
                _error(rows[r], OUT_OF_MEMORY, f"{rows[r]['source_uri']}: the device ran out of "
                       f"memory labelling it, even one prompt at a time ({oom_reason(exc)})")
                continue
            for i, f in zip(mine, part):
                fields[i] = f
        return fields

    def _rows(self, row: dict, seg_fields: list[dict], encodings: list) -> tuple[dict, list]:
        from kimi_ops.audio import SAMPLE_RATE
        from kimi_ops.tasks.base import merge_segments

        common = {"etag": row["etag"], "run_id": self.run_id, "model_id": self.model_id}
        file_row = {"source_uri": row["source_uri"], "size_bytes": row["size_bytes"],
                    "sample_rate": row["sample_rate"], "channels": row["channels"], **common}
        if row["error_kind"] is not None:
            # the duration when known (too_long: from the header), so a rerun can decide
            file_row.update(status="error", duration_s=row["duration_s"],
                            error={"kind": row["error_kind"], "message": row["error_message"]})
            return file_row, []
        segments = row["segments"]
        merged = merge_segments(seg_fields, [s["end"] - s["start"] for s in segments], self.tasks)
        file_row.update(status="ok", duration_s=row["duration_s"], num_segments=len(segments),
                        transcript=merged.get("transcript"))
        seg_rows = []
        for i, (seg, f, enc) in enumerate(zip(segments, seg_fields, encodings),
                                          row["first_segment"]):
            seg_row = {"source_uri": row["source_uri"], "segment_index": i,
                       "start_s": seg["start"] / SAMPLE_RATE, "end_s": seg["end"] / SAMPLE_RATE,
                       "status": "silent" if seg["silent"] else "ok",
                       "task_versions": self.versions, "generation": self.generation,
                       **common, **f}
            if self.semantic_tokens:
                seg_row["semantic_tokens"] = [int(t) for t in enc.tokens]
            seg_rows.append(seg_row)
        return file_row, seg_rows


def write_atomic(fs, root: str, relative: str, write: Callable[[Any], None],
                 retry=None) -> None:
    """`write(handle)` into `<root>/_staging/`, then move the object to `<root>/<relative>`, so
    a reader never sees a partial object (an interrupted upload can be listed on some stores).
    The whole write-and-move is retried under `retry` (a `pipelines.storage.RetryPolicy`)."""
    from pipelines.storage import retrying, uri_of

    staged = f"{root}/_staging/{relative.replace('/', '-')}"
    final = f"{root}/{relative}"

    def write_and_move() -> None:
        fs.makedirs(f"{root}/_staging", exist_ok=True)
        with fs.open(staged, "wb") as handle:
            write(handle)
        fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(staged, final)

    retrying(write_and_move, uri_of(fs, final), action="write", policy=retry)


def write_parquet_atomic(fs, root: str, relative: str, table: pa.Table, retry=None) -> None:
    import pyarrow.parquet as pq

    write_atomic(fs, root, relative, lambda handle: pq.write_table(table, handle), retry)


def shard_name(uris_and_etags: list[tuple[str, str | None]]) -> str:
    """Deterministic per batch content: the same objects always land in the same shard name."""
    digest = hashlib.sha256()
    for uri, etag in sorted(uris_and_etags, key=lambda x: (x[0], x[1] or "")):
        digest.update(f"{uri}\0{etag or ''}\n".encode())
    return f"part-{digest.hexdigest()[:20]}.parquet"


class WriteStage:
    """Typed Parquet shards: the segments shard first, then the files shard, whose presence marks
    the shard complete (a reader of `files/` never sees a half-written shard; the planner removes
    segments shards left without their files shard by a crash). Returns one summary row per file
    (`SUMMARY_SCHEMA`); a piece of a long file is not written here but handed on, rows and all,
    to the driver's `PieceStitcher`, which writes the file once all its pieces are in."""

    def __init__(self, output: str, storage_options: dict | None, task_specs: list[str],
                 task_params: dict, semantic_tokens: bool, retry=None):
        from kimi_ops.tasks import get_task
        from pipelines.schema import files_schema, segments_schema

        self.tasks = [get_task(spec, **task_params) for spec in task_specs]
        self.output = output.rstrip("/")
        self.storage_options = storage_options
        self.files_schema = files_schema(self.tasks)
        self.segments_schema = segments_schema(self.tasks, semantic_tokens)
        self.retry = retry  # a pipelines.storage.RetryPolicy; None: the default

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        start = time.perf_counter()
        whole = pc.equal(batch["pieces"], 1)
        done = batch.filter(whole)
        files = [json.loads(s) for s in done["files_json"].to_pylist()]
        if files:
            self.write(files, [seg for s in done["segments_json"].to_pylist()
                               for seg in json.loads(s)])
        elapsed = time.perf_counter() - start
        rows = [{**summary_row(f, **times, write_s=elapsed / len(files)), "piece": 0, "pieces": 1}
                for f, times in zip(files, done.select(STAGE_TIMES).to_pylist())]
        # a piece goes on as the stitcher's input; its file's summary comes from the stitch
        rows += batch.filter(pc.invert(whole)).select(PIECE_COLUMNS).to_pylist()
        return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)

    def write(self, files: list[dict], segments: list[dict]) -> None:
        """One shard of `files` (and their `segments`), named by the files' URIs and etags."""
        from pipelines.schema import to_table
        from pipelines.storage import resolve

        name = shard_name([(f["source_uri"], f["etag"]) for f in files])
        fs, root = resolve(self.output, self.storage_options)
        for table_name, rows, schema in (("segments", segments, self.segments_schema),
                                         ("files", files, self.files_schema)):
            write_parquet_atomic(fs, root, f"{table_name}/{name}", to_table(rows, schema),
                                 self.retry)


STAGE_TIMES = ("decode_s", "frontend_s", "label_s")
REPORT_COLUMNS = ("source_uri", "status", "error_kind", "duration_s", "num_segments",
                  *STAGE_TIMES, "write_s")  # a file's line in the run report
SUMMARY_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("status", pa.string()), ("error_kind", pa.string()),
    ("duration_s", pa.float64()), ("num_segments", pa.int64()),
    *((name, pa.float64()) for name in (*STAGE_TIMES, "write_s")),
    # a piece of a long file: which one, of how many, and its rows for the stitcher
    ("piece", pa.int32()), ("pieces", pa.int32()),
    ("files_json", pa.large_string()), ("segments_json", pa.large_string()),
])
PIECE_COLUMNS = ("source_uri", "piece", "pieces", "files_json", "segments_json", *STAGE_TIMES)


def summary_row(file_row: dict, **seconds: float) -> dict:
    """A written file's line in the run report: its status, audio and each stage's seconds."""
    return {"source_uri": file_row["source_uri"], "status": file_row["status"],
            "error_kind": (file_row.get("error") or {}).get("kind"),
            "duration_s": (file_row.get("duration_s") or 0.0) if file_row["status"] == "ok"
            else 0.0,  # the report's audio hours are the labelled ones
            "num_segments": file_row.get("num_segments") or 0, **seconds}


class PieceStitcher:
    """The driver's end of the job: passes whole files' summary rows through and holds a long
    file's pieces until all are in, then stitches and writes the file (its segments in order,
    its transcript joined over all of them) through `writer.write`, as one shard, like any
    other. A file with a failed piece gets that piece's error row and no segments: every input
    stays one row. Nothing of a file is written before all its pieces are labelled, so a run
    that dies in between leaves no trace of it and the rerun labels it again."""

    def __init__(self, writer: WriteStage):
        self.writer = writer
        self.pending: dict[str, dict[int, dict]] = {}
        self.files = 0  # long files stitched
        self.pieces = 0

    def add(self, row: dict) -> list[dict]:
        """Summary rows that are final after `row` (a `SUMMARY_SCHEMA` row): [] while its file
        waits for pieces."""
        if row["pieces"] == 1:
            return [{k: row[k] for k in REPORT_COLUMNS}]
        got = self.pending.setdefault(row["source_uri"], {})
        got[row["piece"]] = row  # a piece Ray re-ran replaces itself
        if len(got) < row["pieces"]:
            return []
        del self.pending[row["source_uri"]]
        return [self._stitch([got[i] for i in sorted(got)])]

    def _stitch(self, pieces: list[dict]) -> dict:
        from kimi_ops.tasks.base import merge_segments

        start = time.perf_counter()
        files = [json.loads(p["files_json"]) for p in pieces]
        failed = next((f for f in files if f["status"] == "error"), None)
        file_row, segments = dict(failed or files[0]), []
        if failed is None:
            segments = [seg for p in pieces for seg in json.loads(p["segments_json"])]
            lengths = [seg["end_s"] - seg["start_s"] for seg in segments]
            file_row.update(num_segments=len(segments), transcript=merge_segments(
                segments, lengths, self.writer.tasks).get("transcript"))
        self.writer.write([file_row], segments)
        self.files, self.pieces = self.files + 1, self.pieces + len(pieces)
        return summary_row(file_row, **{k: sum(p[k] for p in pieces) for k in STAGE_TIMES},
                           write_s=time.perf_counter() - start)

    def check_complete(self) -> None:
        """Raise if a file still misses pieces when the dataset is exhausted (never expected:
        Ray Data delivers every row or fails the run)."""
        if self.pending:
            uri, got = next(iter(self.pending.items()))
            expected = next(iter(got.values()))["pieces"]
            raise RuntimeError(f"{len(self.pending)} long file(s) lack pieces at the end of the "
                               f"run, e.g. {uri}: {len(got)} of {expected}; a rerun labels them")

