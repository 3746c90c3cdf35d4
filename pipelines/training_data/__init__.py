"""Training shards from a labelled output: segments with their semantic tokens and labels.

    spec = TrainingDataSpec(input="s3://audio/labels", output="s3://audio/train-v1",
                            filters=TrainingFilters(min_duration_s=1.0,
                                                    min_confidence={"emotion": 0.5}),
                            validation_fraction=0.05, formats=["webdataset", "lhotse", "hf"])
    check_training_data(spec)          # footers only; TrainingDataError names the reason
    manifest = build_training_data(spec)

One module a job each:
  spec       `TrainingDataSpec`, `TrainingFilters`: the parameters, declared once
  errors     `TrainingDataError` (a `PipelineError`)
  source     the input: footers checked (`inspect_source`), rows read for selection
  selection  which segments are kept (`DROP_REASONS`, the quality-signal `SIGNAL_RULES`), the
             split, the rows written
  shards     Parquet and WebDataset shards, written as they fill
  exports    the exports with audio (lhotse, hf), fed each shard as it is written
  audio      a segment's audio: the source decoded as the run decoded it, cut, 16 kHz FLAC
  hf         HF dataset shards: Parquet with a `datasets.Audio` column
  lhotse_manifests  lhotse recordings + supervisions (JSONL) and a FLAC per segment
  output     the output folder's layout, and clearing it for a build
  build      `build_training_data`: the build and its manifest
  checks     `check_training_data`: the console's pre-flight
  summary    `format_training_data`: a finished build in a few lines
"""

from pipelines.training_data.build import build_training_data
from pipelines.training_data.checks import check_training_data
from pipelines.training_data.errors import TrainingDataError
from pipelines.training_data.output import MANIFEST
from pipelines.training_data.selection import DROP_REASONS, SIGNAL_RULES, sample_key, split_of
from pipelines.training_data.source import SourceInfo, inspect_source
from pipelines.training_data.spec import FILTER_OPTIONS, TrainingDataSpec, TrainingFilters
from pipelines.training_data.summary import format_training_data, shard_counts

__all__ = [
    "DROP_REASONS", "FILTER_OPTIONS", "MANIFEST", "SIGNAL_RULES", "SourceInfo", "TrainingDataError", "TrainingDataSpec",
    "TrainingFilters", "build_training_data", "check_training_data", "format_training_data",
    "inspect_source", "sample_key", "shard_counts", "split_of",
]
