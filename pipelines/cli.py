"""`kimi-label`: the product's command line.

  kimi-label run --input URI --output URI --model DIR [--tasks asr,emotion,scene]
                 [--ray-address ADDR] [--storage-options JSON] ...
  kimi-label generate | audio-tokens | label | make-tiny-checkpoint | demo   (see kimi_ops)

`run` exits 0 when the job completed (error rows included), 2 with a one-line reason when it
could not run; every such reason is found before any Ray actor starts.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.job import STAGES, known_stages
from pipelines.stages import PIECE_SECONDS

OPTIONS = {"endpoint_url": "--storage-options endpoint_url"}  # not named `--<field name>`


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kimi-label run",
                                description="label every audio object under --input into Parquet")
    add_job_options(p)
    return p


def add_job_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                    max_new_tokens: int = 256,
                    output_help: str = "output URI: files/ and segments/ go under it") -> None:
    """`kimi-label run`'s options on `p`, less those in `skip` (e.g. "--tasks"): the commands
    of the flows that run a labelling job share their names, meaning and help."""

    def add(flag: str, **kwargs) -> None:
        if flag not in skip:
            p.add_argument(flag, **kwargs)

    add("--input", required=True,
        help="s3://bucket/prefix, any fsspec URI, a local folder, or a manifest "
             "(.parquet/.csv/.jsonl with a uri column)")
    add("--output", required=True, help=output_help)
    add("--model", required=True, help="Kimi-Audio checkpoint folder")
    from kimi_ops.tasks import TASKS  # (no torch)

    add("--glm-tokenizer", default=None,
        help="GLM-4-Voice tokenizer folder (default: glm-4-voice-tokenizer/ in the checkpoint)")
    add("--tasks", default="asr",
        help=f"comma-separated, from {', '.join(TASKS)}; label-set variants scene:tut2017, "
             "sound_event:nonspeech7k (default: %(default)s)")
    add("--language", choices=["auto", "en", "zh"], default="auto",
        help="the speech's language for asr prompts (default: %(default)s)")
    add("--question", default=None, help="the question the `question` task asks of each clip")
    add("--max-new-tokens", type=int, default=max_new_tokens,
        help="generated tokens per segment and task at most (default: %(default)s)")
    add("--max-audio-seconds", type=float, default=None,
        help="longer inputs get a too_long error row (default: "
             "$KIMI_MAX_AUDIO_SECONDS, else 6 hours)")
    add("--piece-seconds", type=float, default=PIECE_SECONDS,
        help="a longer file travels through the stages as pieces of whole segments of "
             "at most this much audio (>= 30), so a stage's batch of N rows holds at "
             "most N times this much")
    add("--semantic-tokens", action="store_true",
        help="also write each segment's 12.5 Hz VQ tokens (training-data preparation)")
    add("--extensions", default=None,
        help="comma-separated, e.g. wav,flac,aiff (default: wav,flac,ogg,opus,mp3)")
    add("--storage-options", default=None,
        help="JSON for fsspec/s3fs (key, secret, client_kwargs...); default: AWS_* env")
    add("--ray-address", default=None,
        help="join this Ray cluster, host:port of its GCS or auto (default: $RAY_ADDRESS, "
             "else a Ray of the job's own on this machine)")
    add("--device", default=None,
        help="cpu, cuda or cuda:N for the model actors (default: cuda where an actor has a GPU)")
    add("--stages", default=None,
        help='JSON per stage, e.g. {"label": {"num_gpus": 1, "concurrency": 8, '
             '"batch_size": 32}}; stages: decode, frontend, label, write '
             "(default: CPU shares here; one front-end + one label actor per GPU)")
    add("--run-id", default=None,
        help="names this run's rows and _runs/<id>/ (default: time and a random suffix)")


def json_object(option: str, text: str | None, example: str) -> dict | None:
    """The JSON object an option holds (None when not given), or a ValueError naming the
    option. Messages quote the position of a syntax error, never the text (it may hold a
    secret)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, e.g. {example}")
    return value


def parse_storage_options(text: str | None) -> dict | None:
    options = json_object("--storage-options", text, '{"endpoint_url": "http://host:8333"}')
    if options is not None and not isinstance(options.get("client_kwargs") or {}, dict):
        raise ValueError("--storage-options: client_kwargs must be a JSON object, e.g. "
                         '{"client_kwargs": {"region_name": "eu-west-1"}}')
    return options


def parse_stages(text: str | None) -> dict:
    stages = json_object("--stages", text, '{"label": {"batch_size": 32}}') or {}
    try:
        return known_stages(stages)
    except ValueError as exc:
        raise ValueError(f"--stages: {exc}") from None


def option_error(exc, options: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError's first error as one line naming the option it came from
    (`--stages label.batch_size: ...`; `options`: field -> option where the option is not
    `--<field name>`); messages carry no input values."""
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    loc = [str(part) for part in error["loc"]]
    if not loc:
        return message
    if loc[0] in STAGES:  # a JobSpec's stage fields come from --stages
        loc = ["stages", *loc]
    option = {**OPTIONS, **(options or {})}.get(loc[0], "--" + loc[0].replace("_", "-"))
    return f"{option} {'.'.join(loc[1:])}: {message}" if loc[1:] else f"{option}: {message}"


def cmd_run(argv: list[str]) -> int:
    from pydantic import ValidationError

    from pipelines.job import JobError, JobSpec, check_new_run_id, run_job

    args = build_run_parser().parse_args(argv)
    try:
        options = parse_storage_options(args.storage_options)
        stages = parse_stages(args.stages)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        spec = JobSpec(
            input=args.input, output=args.output, model=args.model,
            glm_tokenizer=args.glm_tokenizer, tasks=[t for t in args.tasks.split(",") if t],
            language=args.language, question=args.question, max_new_tokens=args.max_new_tokens,
            max_audio_seconds=args.max_audio_seconds, piece_seconds=args.piece_seconds,
            semantic_tokens=args.semantic_tokens, storage_options=options,
            extensions=args.extensions.split(",") if args.extensions else None,
            ray_address=args.ray_address, device=args.device, run_id=args.run_id, **stages)
        check_new_run_id(spec)
        report = run_job(spec)
    except ValidationError as exc:
        print(f"error: {option_error(exc)}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    output = report["output"].rstrip("/")  # `--output s3://b/labels/` names the same folder
    planned = report["planned"]
    retried = (f", {planned['retried_errors']} earlier errors tried again"
               if planned.get("retried_errors") else "")
    if planned.get("not_listed"):
        named = report.get("not_listed", [])[:3]  # (an older report names none)
        more = planned["not_listed"] - len(named)
        listed = ", ".join(named) + (f" and {more} more" if named and more > 0 else "")
        retried += (f"; {planned['not_listed']} objects with rows here are not in this input "
                    f"(deleted, or outside it; their rows stay){': ' + listed if named else ''}")
    if planned.get("duplicates"):
        retried += f"; {planned['duplicates']} repeated entries of the input labelled once"
    skipped = report.get("skipped_by_extension") or {}
    if skipped:
        retried += ("; skipped by extension: " + ", ".join(
            f"{n} .{ext}" if ext else f"{n} without one"
            for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1])[:5]))
    lines = [f"run {report['run_id']}: {report['processed']} processed "
             f"({planned.get('already_done', 0)} already done{retried}), "
             f"status {report['status']}, errors {report['errors_by_kind']}",
             f"audio {report['audio_hours'] * 3600:.1f} s in {report['wall_s']:.1f} s "
             f"({report['audio_hours_per_hour']:.1f} audio-hours per hour)",
             f"output: {output}/files/ and {output}/segments/; "
             f"report: {output}/_runs/{report['run_id']}/report.json"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return cmd_run(argv[1:])
    from kimi_ops.__main__ import main as kimi_ops_main

    return kimi_ops_main(argv)


if __name__ == "__main__":
    sys.exit(main())
