"""`prepare-training-data`: turn a labelled output into train/validation shards.

Thin by design: check the parameters, the input and the output
(`pipelines.training_data.check_training_data`: a labelled output made with --semantic-tokens,
filters naming its tasks, an output holding no build unless `overwrite`) -> build the shards
(`build_training_data`, retried: an attempt that dies midway leaves no manifest, and the next
one clears its shards and starts again) -> publish counts and the manifest's location. The
flow's parameter is its `TrainingDataSpec`.

Credentials are never flow parameters: `storage_options` leaves them out of every dump, so they
come from the worker's AWS_* environment; only the non-secret endpoint and region may be passed.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.credentials import with_credentials_read
from flows.retry import retry_unless_final
from pipelines.training_data import (
    SourceInfo,
    TrainingDataError,
    TrainingDataSpec,
    build_training_data,
    check_training_data,
    shard_counts,
)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_final)
def check_source(spec: TrainingDataSpec) -> SourceInfo:
    return check_training_data(spec)


@task(retries=2, retry_delay_seconds=30, retry_condition_fn=retry_unless_final)
def build_shards(spec: TrainingDataSpec) -> dict[str, Any]:
    return build_training_data(spec)


def summary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    counts = manifest["counts"]
    rows = [{"metric": "input segments", "value": counts["input_segments"]},
            {"metric": "kept", "value": counts["kept"]}]
    for split, stats in counts["splits"].items():
        rows += [{"metric": f"{split}: segments", "value": stats["rows"]},
                 {"metric": f"{split}: source files", "value": stats["source_files"]},
                 {"metric": f"{split}: hours", "value": round(stats["duration_s"] / 3600, 4)},
                 {"metric": f"{split}: shards",
                  "value": sum(1 for s in manifest["shards"]
                               if s["split"] == split and s["format"] == "parquet")}]
    rows += [{"metric": f"dropped: {reason}", "value": n}
             for reason, n in counts["dropped"].items()]
    return rows


@task
def publish(manifest: dict[str, Any]) -> None:
    create_table_artifact(key="prepare-training-data-counts", table=summary_rows(manifest),
                          description=f"training data from {manifest['source']}")
    counts = manifest["counts"]
    splits = counts["splits"]
    create_markdown_artifact(key="prepare-training-data-output", markdown=(
        f"### Training data in `{manifest['destination']}`\n\n"
        f"- manifest: `{manifest['manifest_uri']}`\n"
        f"- source: `{manifest['source']}` (runs: {', '.join(manifest['source_runs']) or '-'})\n"
        f"- kept {counts['kept']} of {counts['input_segments']} segments: "
        f"train {splits['train']['rows']}, validation {splits['validation']['rows']}\n"
        f"- shards: {shard_counts(manifest)}\n"))


@flow(name="prepare-training-data", log_prints=True)
def prepare_training_data(params: TrainingDataSpec) -> dict[str, Any]:
    logger = get_run_logger()
    try:
        spec = with_credentials_read(params)
        info = check_source(spec)
        if info.shards_without_tokens:
            logger.warning("%d segments shards have no semantic_tokens (labelled without "
                           "--semantic-tokens): their rows are dropped",
                           info.shards_without_tokens)
        manifest = build_shards(spec)
    except TrainingDataError as exc:
        raise TrainingDataError(f"prepare-training-data cannot run: {exc}") from None
    publish(manifest)
    logger.info("kept %d of %d segments -> %s", manifest["counts"]["kept"],
                manifest["counts"]["input_segments"], manifest["manifest_uri"])
    return manifest
