"""Label stage (an actor, on a GPU when there is one): every task of the job over every segment
of a batch in one engine pass, then the file's row (its transcript stitched in order, its
signals over its segments: `pipelines.schema.file_fields`) and its segment rows, handed to the
writer as JSON.

Engine failures are not caught: they kill the worker and Ray retries it. The exception is a
file that does not fit the device's memory even alone: an `out_of_memory` error row.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from kimi_ops.audio.segmenters import DEFAULT_SEGMENTER
from pipelines.schema import SPEECH_RATIO, file_fields
from pipelines.spec import STAGE_DEFAULTS, StageResources
from pipelines.stages.base import Stage, error_row, keep_large_buffers_off_the_heap, set_threads
from pipelines.stages.frontend import features_from_bytes

OUT_OF_MEMORY = "out_of_memory"  # the error kind of a file the device cannot label


def generation_settings(tasks, max_new_tokens: int, task_params: dict,
                        segmenter: str) -> dict[str, Any]:
    """What shaped the labels besides the model and the tasks (the token budget, greedy text,
    the tasks' own sampling, the task parameters a task of the run takes, such as asr's
    language, and how files were cut into segments): the
    segments' `generation` column holds it as JSON, `pipelines.job.check_output_settings`
    compares it."""
    from kimi_ops.tasks import TASKS, task_parameters

    used = set().union(*(task_parameters(t.name) for t in tasks if t.name in TASKS))
    return {"max_new_tokens": max_new_tokens, "text_temperature": 0.0, "segmenter": segmenter,
            # only what a task of this run takes: `--question` means nothing to `asr`
            **{k: v for k, v in task_params.items() if v is not None and k in used},
            **{t.name: t.sampling for t in tasks if hasattr(t, "sampling") and t.sampling}}


class LabelStage(Stage):
    """Actor: every selected task over every segment of the batch in one engine pass; builds
    the file's row (transcript stitched in order) and the segment rows, as JSON for the writer."""

    name = "label"
    actor = True

    def __init__(self, model: str, glm_tokenizer: str | None, device: str | None,
                 task_specs: list[str], task_params: dict, max_new_tokens: int,
                 semantic_tokens: bool, model_id: str, run_id: str,
                 segmenter: str = DEFAULT_SEGMENTER, resources: StageResources | None = None):
        from kimi_ops.tasks import get_task

        self.model, self.glm_tokenizer, self.device = model, glm_tokenizer, device
        self.resources = resources or STAGE_DEFAULTS["label"]
        self.engine = None
        self.tasks = [get_task(spec, **task_params) for spec in task_specs]
        self.max_new_tokens = max_new_tokens
        self.semantic_tokens = semantic_tokens
        self.model_id = model_id
        self.run_id = run_id
        self.versions = {t.name: t.version for t in self.tasks}
        self.generation = json.dumps(generation_settings(self.tasks, max_new_tokens,
                                                         task_params, segmenter), sort_keys=True)

    def setup(self) -> None:
        import torch

        from kimi_ops.engine.api import KimiAudio

        if self.engine is not None:
            return
        set_threads(self.resources.threads)
        keep_large_buffers_off_the_heap()
        self.engine = KimiAudio(self.model, glm_tokenizer=self.glm_tokenizer,
                                device=torch.device(self.device) if self.device else None,
                                load_frontend=False)

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
                error_row(rows[r], OUT_OF_MEMORY, f"{rows[r]['source_uri']}: the device ran out of "
                       f"memory labelling it, even one prompt at a time ({oom_reason(exc)})")
                continue
            for i, f in zip(mine, part):
                fields[i] = f
        return fields

    def _rows(self, row: dict, seg_fields: list[dict], encodings: list) -> tuple[dict, list]:
        from kimi_ops.audio import SAMPLE_RATE

        common = {"etag": row["etag"], "run_id": self.run_id, "model_id": self.model_id}
        file_row = {"source_uri": row["source_uri"], "size_bytes": row["size_bytes"],
                    "sample_rate": row["sample_rate"], "channels": row["channels"], **common}
        if row["error_kind"] is not None:
            # the duration when known (too_long: from the header), so a rerun can decide
            file_row.update(status="error", duration_s=row["duration_s"],
                            error={"kind": row["error_kind"], "message": row["error_message"]})
            return file_row, []
        seg_rows = []
        for i, (seg, f, enc) in enumerate(zip(row["segments"], seg_fields, encodings),
                                          row["first_segment"]):
            seg_row = {"source_uri": row["source_uri"], "segment_index": i,
                       "start_s": seg["start"] / SAMPLE_RATE, "end_s": seg["end"] / SAMPLE_RATE,
                       "status": "silent" if seg["silent"] else "ok",
                       SPEECH_RATIO: seg.get(SPEECH_RATIO),
                       "task_versions": self.versions, "generation": self.generation,
                       **common, **f}
            if self.semantic_tokens:
                seg_row["semantic_tokens"] = [int(t) for t in enc.tokens]
            seg_rows.append(seg_row)
        file_row.update(status="ok", duration_s=row["duration_s"],
                        **file_fields(seg_rows, self.tasks))
        return file_row, seg_rows
