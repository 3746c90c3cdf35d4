"""`make demo` / `kimi-label demo`: the main job end to end on embedded defaults.

Starts the embedded stack (SeaweedFS on 127.0.0.1 with credentials), writes a tiny random
checkpoint and self-made sample audio, uploads the audio to the bucket, runs the label-corpus
flow (ephemeral Prefect) which launches the Ray Data job on a local Ray, prints the labels and
where the Parquet is, and stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

DEMO_TASKS = ["asr", "emotion", "scene", "sound_event"]
BUCKET_PREFIX = "s3://audio/demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output",
                        help="local folder for the demo's files (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="generated tokens per segment and task (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from pipelines.local_stack import stack_down, stack_up

    home = out / "stack"
    print(f"starting the embedded stack in {home} (SeaweedFS on 127.0.0.1) ...", flush=True)
    state = stack_up(home)
    try:
        os.environ.update(state.env())  # credentials reach the job through the environment
        label_samples(out, args.max_new_tokens, state)
    finally:
        stopped = stack_down(home)
        print(f"stopped: {', '.join(stopped)}", flush=True)
    return 0


def label_samples(out: Path, max_new_tokens: int, state) -> None:
    """Sample audio uploaded to the stack's bucket, labelled by the label-corpus flow with a
    tiny random checkpoint; the labels printed and the tables copied under `out`."""
    from flows.label_corpus import label_corpus
    from kimi_ops.audio.samples import write_sample_audio
    from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint
    from pipelines.schema import SCHEMA_VERSION
    from pipelines.spec import JobSpec
    from pipelines.storage import OutputLayout, resolve

    checkpoint = out / "tiny_checkpoint"
    if not (checkpoint / "config.json").exists():
        make_tiny_checkpoint(checkpoint, seed=0, preset="tiny")
    print(f"checkpoint: {checkpoint}\n  RANDOM weights: the labels below are meaningless. "
          "For real labels run `kimi-label run --model /path/to/Kimi-Audio-7B-Instruct ...` "
          "(see README).", flush=True)
    fs, root = resolve(f"{BUCKET_PREFIX}/in", state.storage_options())
    files = write_sample_audio(out / "audio")
    fs.pipe({f"{root}/{f.name}": f.read_bytes() for f in files}
            | {f"{root}/broken.wav": b"RIFF\x00\x00\x00\x00WAVE this is not audio"})
    print(f"uploaded {len(files) + 1} objects to {BUCKET_PREFIX}/in/", flush=True)
    # one output per schema version: a demo rerun after an upgrade labels afresh instead of
    # being refused the older output it left
    labels = f"{BUCKET_PREFIX}/labels-v{SCHEMA_VERSION}"
    params = JobSpec(input=f"{BUCKET_PREFIX}/in", output=labels,
                     model=str(checkpoint), tasks=DEMO_TASKS, max_new_tokens=max_new_tokens,
                     storage_options={"endpoint_url": state.env()["AWS_ENDPOINT_URL"]})
    report = label_corpus(params)
    print_results(params, state.storage_options(), report)
    _, bucket = resolve(params.output, state.storage_options())
    local = OutputLayout(str(out / "labels"))
    for table in ("files", "segments"):  # a copy of the bucket's tables, not added to one
        shutil.rmtree(local.table(table), ignore_errors=True)  # an earlier demo left
        fs.get(OutputLayout(bucket).table(table), local.table(table), recursive=True)
    print(f"copies of the Parquet tables: {local.files}/ and {local.segments}/")


def print_results(params, storage_options: dict, report: dict) -> None:
    from pipelines.storage import OutputLayout, read_table_dir, resolve

    fs, root = resolve(params.output, storage_options)
    layout = OutputLayout(root)
    files = [r for _, t in read_table_dir(fs, layout.files, None) for r in t.to_pylist()]
    segments = [r for _, t in read_table_dir(fs, layout.segments, None) for r in t.to_pylist()]
    print(f"\n{'object':<30}{'status':<8}{'sec':>6}{'seg':>4}  {'emotion':<10}{'scene':<16}"
          f"{'sound_event':<16}transcript / error")
    for f in sorted(files, key=lambda r: r["source_uri"]):
        name = f["source_uri"].rsplit("/", 1)[-1]
        if f["status"] != "ok":
            print(f"{name:<30}{'error':<8}{'':>6}{'':>4}  {error_cell(f)}")
            continue
        first = next(s for s in segments if s["source_uri"] == f["source_uri"])
        print(f"{name:<30}{'ok':<8}{f['duration_s']:>6.1f}{f['num_segments']:>4}  "
              f"{first['emotion']:<10}{first['scene']:<16}{first['sound_event']:<16}"
              f"{(f['transcript'] or '')[:30]!r}")
    output = OutputLayout(params.output)
    print(f"\n{run_summary(report)}; Parquet: {output.files}/ and {output.segments}/; "
          f"report: {output.report(report['run_id'])}")


def error_cell(file_row: dict, width: int = 90) -> str:
    """`kind: reason` of an error row, without the URI the message starts with (the table
    names the object already), cut to `width`."""
    error = file_row["error"]
    reason = error["message"].removeprefix(f"{file_row['source_uri']}: ")
    return f"{error['kind']}: {reason}"[:width]


def run_summary(report: dict) -> str:
    """What this run did: `6 new objects (0 already labelled) in 9 s; status {...}`, or on a
    rerun with nothing new `0 new objects (6 already labelled) in 1 s`."""
    line = (f"{report['processed']} new objects "
            f"({report['planned'].get('already_done', 0)} already labelled) "
            f"in {report['wall_s']:.0f} s")
    return f"{line}; status {report['status']}" if report["status"] else line
