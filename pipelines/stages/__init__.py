"""The stages of a labelling job, each a module with one job (contract: `pipelines.stages.base`).

Rows flow one per input object, so a file's segments stay together, except that a long one
travels as several pieces (consecutive segments, at most `piece_seconds` of audio each):

  plan units (shard, start, stop)
  -> PlanReader     the plan rows (uri, size, etag)                   (CPU tasks)
  -> DecodeStage    fetch, decode, resample, segment, cut pieces      (CPU tasks)
  -> FrontendStage  VQ tokens + Whisper features per segment          (actor, GPU when present)
  -> LabelStage     tasks over every segment, file row stitched       (actor, GPU when present)
  -> WriteStage     typed Parquet shards: segments/ then files/       (CPU tasks)
  -> the driver     stitches a long file's pieces (`pipelines.job.stitch`)

The job (`pipelines.job`) builds them from its spec and hands them to the Ray adapter; they are
looked up on this module when a job runs (tests replace one with a subclass here).
"""

from pipelines.stages.base import Stage, run_in_process
from pipelines.stages.decode import DECODED_SCHEMA, DecodeStage
from pipelines.stages.frontend import FrontendStage, features_from_bytes, features_to_bytes
from pipelines.stages.label import OUT_OF_MEMORY, LabelStage, generation_settings
from pipelines.stages.read import PLAN_SCHEMA, PlanReader
from pipelines.stages.write import SUMMARY_SCHEMA, WriteStage, summary_row

__all__ = [
    "DECODED_SCHEMA", "OUT_OF_MEMORY", "PLAN_SCHEMA", "SUMMARY_SCHEMA", "DecodeStage",
    "FrontendStage", "LabelStage", "PlanReader", "Stage", "WriteStage", "features_from_bytes",
    "features_to_bytes", "generation_settings", "run_in_process", "summary_row",
]
