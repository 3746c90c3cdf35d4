"""`kimi-label`: the product's command line.

  kimi-label run --input URI --output URI --model DIR [--tasks asr,emotion,scene] ...
      the label-corpus flow (ephemeral Prefect unless PREFECT_API_URL is set) -> the Ray job
  kimi-label transcribe-archive --input URI --output URI --model DIR [--language en] ...
      the transcribe-archive flow: the Ray job (asr) + SRT/WebVTT under <output>/subtitles/
  kimi-label prepare-training-data --source URI --destination URI [--filters JSON] ...
      the prepare-training-data flow: train/validation shards + manifest.json from a labelled
      output made with --semantic-tokens
  kimi-label stack up|down|status [--home DIR] [--prefect] [--ray]
      the embedded local stack (SeaweedFS, optional Prefect server and Ray head) on 127.0.0.1
  kimi-label evaluate --output URI --references URI [--compare OTHER_OUTPUT] [--report-dir URI]
      label quality against reference labels: prints a table, writes report.json + confusion.png
  kimi-label demo
      the main job on embedded defaults: stack, tiny checkpoint, sample audio, label-corpus flow
  kimi-label generate | audio-tokens | label | make-tiny-checkpoint      (see python -m kimi_ops)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from pipelines.storage import RetryPolicy

DEFAULT_HOME = Path(os.environ.get("KIMI_LABEL_HOME", "~/.kimi-label/stack")).expanduser()
CREDENTIAL_KEYS = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY",
                   "token": "AWS_SESSION_TOKEN"}


def options_to_env(options: dict) -> tuple[dict[str, str], str | None]:
    """Credentials from --storage-options go to this process's AWS_* environment (inherited by
    a local Ray), never into flow parameters, which Prefect stores. Returns (env, endpoint)."""
    if not isinstance(options, dict):
        raise ValueError('--storage-options must be a JSON object, e.g. {"endpoint_url": ...}')
    client = options.get("client_kwargs") or {}
    if not isinstance(client, dict):
        raise ValueError("--storage-options: client_kwargs must be a JSON object")
    env = {CREDENTIAL_KEYS[k]: str(v) for k, v in options.items() if k in CREDENTIAL_KEYS}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    region = options.get("region") or client.get("region_name")
    if region:
        env["AWS_DEFAULT_REGION"] = str(region)
    unknown = set(options) - set(CREDENTIAL_KEYS) - {"client_kwargs", "endpoint_url", "region"}
    if unknown:
        raise ValueError(f"--storage-options: unsupported keys {sorted(unknown)} "
                         "(key, secret, token, endpoint_url, region, client_kwargs)")
    return env, endpoint


# Storage retries of the checks before the flow: a store that does not answer at all when the
# command starts is most often a mistyped endpoint, and the job's budget (`RetryPolicy`, sized to
# ride out a restart mid-run) would keep the user waiting over a minute to be told so.
PREFLIGHT_RETRY = RetryPolicy(attempts=4, base_delay_s=0.5, max_delay_s=2.0, budget_s=5.0)


def check_job(spec) -> None:
    """What the flow's `check_inputs` checks, done here before a flow run starts, so that a
    common mistake costs a second and one line: tasks, checkpoint, input listing, output
    access (`pipelines.job.validate`, with `PREFLIGHT_RETRY`), and a --run-id that names a
    finished run. Raises JobError."""
    import logging

    from pipelines.job import check_new_run_id, validate

    spec = spec.model_copy(update={"storage_retry": PREFLIGHT_RETRY})
    storage_log = logging.getLogger("pipelines.storage")
    level = storage_log.level
    storage_log.setLevel(logging.ERROR)  # its retry warnings: the refusal says how many there were
    try:
        validate(spec)
        check_new_run_id(spec)  # (the spec carries a run id only when --run-id gave one)
    finally:
        storage_log.setLevel(level)


def prefect_defaults() -> None:
    """Before Prefect is imported: the temporary Prefect server of a flow run from here sends no
    telemetry (offline machines logged an ERROR for it); an explicit setting wins."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def storage_env(text: str | None) -> str | None:
    """--storage-options: its credentials go to this process's AWS_* environment
    (`options_to_env`), its endpoint is returned (a flow parameter). Raises ValueError."""
    from pipelines.cli import parse_storage_options

    env, endpoint = options_to_env(parse_storage_options(text) or {})
    os.environ.update(env)
    return endpoint


def run_flow(flow, params, name: str, summary, api_checked: bool = False) -> int:
    """Run `flow(params)` here; print `summary(result)` and return 0, or the failure's reason
    as one `error:` line and 2. `api_checked`: the caller asked `prefect_api_unreachable`."""
    unreachable = None if api_checked else prefect_api_unreachable()
    if unreachable:
        print(f"error: {unreachable}", file=sys.stderr)
        return 2
    with tracebacks_only_for_bugs():
        start_temporary_server()
        state = flow(params, return_state=True)
    if not state.is_completed():
        print(f"error: {failure_reason(state, name)}", file=sys.stderr)
        return 2
    print(summary(state.result()))
    return 0


def prefect_api_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Prefect API this process is set to use (PREFECT_API_URL, from the environment
    or a Prefect profile) cannot be reached, or None (also when none is set: a temporary server
    is started). Asked through Prefect's own client, so its TLS settings apply, as Prefect's
    engine asks before a run: /health must answer 2xx. Prefect's client otherwise retried for
    minutes and ended in a page of tracebacks."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    with get_client(sync_client=True, httpx_settings={"timeout": timeout_s}) as client:
        error = client.api_healthcheck()  # what Prefect's engine asks before a run, too
    if error is None:
        return None
    if isinstance(error, httpx.HTTPStatusError):
        return (f"the Prefect API at {url} (PREFECT_API_URL) answers HTTP "
                f"{error.response.status_code} for /health: not a Prefect API, or it refuses "
                "this client (PREFECT_API_KEY)")
    return (f"the Prefect API at {url} (PREFECT_API_URL) does not answer "
            f"({type(error).__name__}: {error}): start it (`kimi-label stack up --prefect`), or "
            "unset PREFECT_API_URL to run with a temporary server")


def start_temporary_server() -> None:
    """Without an API URL, Prefect starts a temporary API server for the flow run; start it
    here instead, so that it runs in its own session and dies with this process.

    In the command's process group, a terminal's Ctrl-C (sent to the whole group) also stopped
    the server the interrupted run reports its crash to, and the command waited minutes on
    its client's timeouts. A SIGKILLed command left the server running for good; Linux's
    parent-death signal (`prctl`, from this main thread, which lives as long as the process)
    now stops it. Prefect's client finds the server it starts on its own and uses it.
    """
    import subprocess

    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    temporary = prefect_server.SubprocessASGIServer()
    if temporary.running:
        return
    launch = temporary._run_uvicorn_command  # Popen(args=..., env=...) of uvicorn
    popen = subprocess.Popen
    on_start = parent_death_signal()

    def detached(*args, **kwargs):
        return popen(*args, start_new_session=True, preexec_fn=on_start, **kwargs)

    def launch_detached():
        subprocess.Popen = detached
        try:
            return launch()
        finally:
            subprocess.Popen = popen

    temporary._run_uvicorn_command = launch_detached
    temporary.start()


def parent_death_signal():
    """A `preexec_fn` asking Linux to send the child SIGTERM when its parent dies (None where
    `prctl` is missing). The C function is looked up here, not in the forked child."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors whose message is the whole story for a user: the flows' and the job's."""
    from flows.label_corpus import CannotRun
    from pipelines.job import JobError
    from pipelines.storage import StorageError

    return CannotRun, JobError, StorageError


def failure_reason(state, name: str) -> str:
    """A failed flow run's reason: the message of one of `user_errors`, else the exception's
    type and message, else Prefect's state message."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, user_errors()):
        return str(exc)
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or f"the {name} flow failed"


@contextlib.contextmanager
def tracebacks_only_for_bugs():
    """Prefect logs a failing flow's or task's exception with its stack. For `user_errors`
    the log line keeps the message and drops the stack (the command ends with the reason
    anyway); anything else, a bug, keeps its traceback."""
    import logging

    expected = user_errors()

    def strip(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], expected):
            record.exc_info, record.exc_text = None, None
        return True

    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addFilter(strip)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(strip)


def cmd_run(argv: list[str]) -> int:
    prefect_defaults()
    from pipelines.cli import build_run_parser, format_report

    parser = build_run_parser()
    parser.add_argument("--credentials-block", default=None,
                        help="name of a Prefect Secret block with the S3 credentials "
                             '({"key": ..., "secret": ...}); checked before the flow starts, '
                             'read again when it runs')
    args = parser.parse_args(argv)
    from flows.label_corpus import LabelCorpusParams, label_corpus

    def params(stages: dict, endpoint: str | None) -> LabelCorpusParams:
        return LabelCorpusParams(
            input=args.input, output=args.output, model=args.model,
            glm_tokenizer=args.glm_tokenizer, tasks=[t for t in args.tasks.split(",") if t],
            language=args.language, question=args.question, max_new_tokens=args.max_new_tokens,
            max_audio_seconds=args.max_audio_seconds, piece_seconds=args.piece_seconds,
            semantic_tokens=args.semantic_tokens,
            extensions=([e.strip() for e in args.extensions.split(",") if e.strip()]
                        if args.extensions is not None else None),
            endpoint_url=endpoint, credentials_block=args.credentials_block,
            ray_address=args.ray_address, device=args.device, run_id=args.run_id,
            stages=stages)

    return launch_job_flow(label_corpus, "label-corpus", args, params, format_report)


def launch_job_flow(flow, name: str, args, make_params, formatter) -> int:
    """A labelling flow from the command line: `--stages` and `--storage-options` parsed (the
    credentials to this process's environment, `storage_env`), `make_params(stages, endpoint)`
    validated and the job checked before the flow starts (one line, exit 2), then the flow."""
    from pydantic import ValidationError

    from flows.label_corpus import CredentialsError, load_credentials
    from pipelines.cli import option_error, parse_stages
    from pipelines.job import JobError

    try:
        stages = parse_stages(args.stages)
        endpoint = storage_env(args.storage_options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        params = make_params(stages, endpoint)
        block = getattr(params, "credentials_block", None)
        unreachable = prefect_api_unreachable()  # before the checks touch the output
        if unreachable:
            print(f"error: {unreachable}", file=sys.stderr)
            return 2
        # a credentials block is read here as well as by the flow (a deployment's runs have
        # only the flow's read): a missing or malformed block, or a key the store refuses, is
        # one line before the flow starts
        check_job(params.job_spec(credentials=load_credentials(block)) if block
                  else params.job_spec())
    except ValidationError as exc:
        print(f"error: {option_error(exc)}", file=sys.stderr)
        return 2
    except (JobError, CredentialsError) as exc:
        print(f"error: {name} cannot run: {exc}", file=sys.stderr)
        return 2
    return run_flow(flow, params, name, formatter, api_checked=True)


def cmd_transcribe_archive(argv: list[str]) -> int:
    prefect_defaults()
    from flows.transcribe_archive import TranscribeArchiveParams, transcribe_archive
    from pipelines.cli import add_job_options

    p = argparse.ArgumentParser(prog="kimi-label transcribe-archive",
                                description="transcribe every new or changed recording under "
                                            "--input: Parquet tables and SRT/WebVTT subtitles")
    add_job_options(p, skip=("--glm-tokenizer", "--tasks", "--question", "--semantic-tokens",
                             "--extensions", "--device", "--run-id"),
                    max_new_tokens=TranscribeArchiveParams.model_fields["max_new_tokens"].default,
                    output_help="output URI: files/, segments/ and subtitles/ go under it")
    args = p.parse_args(argv)

    def params(stages: dict, endpoint: str | None) -> TranscribeArchiveParams:
        return TranscribeArchiveParams(
            input=args.input, output=args.output, model=args.model, language=args.language,
            max_new_tokens=args.max_new_tokens, max_audio_seconds=args.max_audio_seconds,
            piece_seconds=args.piece_seconds, endpoint_url=endpoint,
            ray_address=args.ray_address, stages=stages)

    return launch_job_flow(transcribe_archive, "transcribe-archive", args, params,
                           format_transcription)


def format_transcription(report: dict) -> str:
    """`kimi-label run`'s report of the job, then what the subtitles step did."""
    from pipelines.cli import format_report

    subs = report["subtitles"]
    removed, recovered = subs["subtitle_files_removed"], subs.get("recovered", 0)
    return "\n".join([
        format_report(report),
        f"subtitles: {subs['subtitle_files']} files (.srt, .vtt) for {subs['recordings']} "
        f"recordings of this run ({subs['segments']} segments)"
        + (f" and {recovered} of earlier runs whose files were missing or stale"
           if recovered else "")
        + (f", {removed} stale removed" if removed else "") + f" in {subs['subtitles_dir']}"])


def cmd_prepare_training_data(argv: list[str]) -> int:
    prefect_defaults()
    from pydantic import ValidationError

    from flows.prepare_training_data import PrepareTrainingDataParams, prepare_training_data
    from pipelines.cli import json_object, option_error
    from pipelines.training_data import TrainingDataError

    fields = PrepareTrainingDataParams.model_fields
    p = argparse.ArgumentParser(prog="kimi-label prepare-training-data",
                                description="train/validation shards and manifest.json from a "
                                            "labelled output made with --semantic-tokens")
    p.add_argument("--source", required=True,
                   help="a labelled output (the --output of kimi-label run --semantic-tokens)")
    p.add_argument("--destination", required=True,
                   help="where train/, validation/, webdataset/ and manifest.json go")
    p.add_argument("--filters", default=None,
                   help='JSON, e.g. {"min_duration_s": 1.0, "min_confidence": {"emotion": 0.5}, '
                        '"drop_truncated": false}; fields: drop_truncated, drop_looped, '
                        "min_duration_s, max_duration_s, min_confidence, require_transcript")
    p.add_argument("--validation-fraction", type=float,
                   default=fields["validation_fraction"].default,
                   help="share of the source files (whole files) in validation/")
    p.add_argument("--split-salt", default=fields["split_salt"].default,
                   help="another salt gives another (still deterministic) split")
    p.add_argument("--rows-per-shard", type=int, default=fields["rows_per_shard"].default)
    p.add_argument("--webdataset", action="store_true",
                   help="also WebDataset tars (<key>.json + <key>.tokens.npy per segment)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a build the destination already holds")
    p.add_argument("--storage-options", default=None,
                   help="JSON for fsspec/s3fs (key, secret, client_kwargs...); default: AWS_* env")
    args = p.parse_args(argv)
    try:
        filters = json_object("--filters", args.filters,
                              '{"min_duration_s": 1.0, "drop_truncated": false}')
        endpoint = storage_env(args.storage_options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        params = PrepareTrainingDataParams(
            source=args.source, destination=args.destination,
            **({"filters": filters} if filters is not None else {}),
            validation_fraction=args.validation_fraction, split_salt=args.split_salt,
            rows_per_shard=args.rows_per_shard, webdataset=args.webdataset,
            overwrite=args.overwrite, endpoint_url=endpoint)
        check_training_data(params.spec())
    except ValidationError as exc:
        print(f"error: {option_error(exc)}", file=sys.stderr)
        return 2
    except TrainingDataError as exc:
        print(f"error: prepare-training-data cannot run: {exc}", file=sys.stderr)
        return 2
    return run_flow(prepare_training_data, params, "prepare-training-data",
                    format_training_data)


def check_training_data(spec) -> None:
    """What the flow's `check_source` checks (a labelled output with semantic tokens, filters
    naming its columns), and that the destination holds no build unless --overwrite, done here
    before a flow run starts. The store's own exceptions (s3fs, botocore) are named as storage
    errors, never with a secret. Raises TrainingDataError."""
    from pipelines.storage import redact_uri, resolve, storage_error
    from pipelines.training_data import MANIFEST, TrainingDataError, inspect_source

    try:
        inspect_source(spec)
    except TrainingDataError:
        raise
    except Exception as exc:
        raise TrainingDataError(
            f"source: {storage_error(exc, spec.source, spec.storage_options, 'read')}") from None
    if spec.overwrite:
        return
    try:
        fs, root = resolve(spec.destination, spec.dest_options())
        built = fs.exists(f"{root}/{MANIFEST}")
    except Exception as exc:
        raise TrainingDataError("destination: " + str(storage_error(
            exc, spec.destination, spec.dest_options(), "read"))) from None
    if built:
        raise TrainingDataError(f"{redact_uri(spec.destination)} already holds a build "
                                f"({MANIFEST}); pass --overwrite to replace it")


def format_training_data(manifest: dict) -> str:
    from pipelines.storage import redact_uri

    counts = manifest["counts"]
    splits = ", ".join(f"{name} {s['rows']} ({s['source_files']} files, "
                       f"{s['duration_s'] / 3600:.4f} h)" for name, s in counts["splits"].items())
    dropped = ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items())
    formats = Counter(s["format"] for s in manifest["shards"])
    empty = []
    if not counts["kept"] and counts["input_segments"]:
        most = max(counts["dropped"].items(), key=lambda kv: kv[1], default=("?", 0))[0]
        empty = [f"warning: the build is empty: every segment was dropped, most by {most} "
                 "(--filters sets the rules, e.g. '{\"drop_truncated\": false}'; a new build "
                 "into this destination needs --overwrite)"]
    return "\n".join([
        *empty,
        f"kept {counts['kept']} of {counts['input_segments']} segments: {splits}; "
        f"dropped: {dropped or 'none'}",
        f"shards: {formats['parquet']} Parquet"
        + (f" + {formats['webdataset']} WebDataset tars" if manifest["webdataset"] else "")
        + f" under {manifest['destination'].rstrip('/')}/",
        f"manifest: {redact_uri(manifest['manifest_uri'])}"])


def cmd_evaluate(argv: list[str]) -> int:
    """Scores in this process (no Prefect, no Ray); the `evaluate` flow is for deployments."""
    p = argparse.ArgumentParser(prog="kimi-label evaluate",
                                description="score a labelled output against reference labels")
    p.add_argument("--output", required=True, help="labelled output URI (files/, segments/)")
    p.add_argument("--references", required=True,
                   help="Parquet/CSV/JSONL keyed by source_uri[, segment_index] with any of "
                        "transcript (+ language), emotion, scene, sound_event")
    p.add_argument("--compare", default=None, help="another labelled output of the same inputs")
    p.add_argument("--report-dir", default=None,
                   help="where report.json and confusion.png go "
                        "(default: <output>/_evaluations/<UTC time>)")
    p.add_argument("--bins", type=int, default=10,
                   help="calibration bins, equal width (default: %(default)s)")
    p.add_argument("--storage-options", default=None,
                   help="JSON (key, secret, endpoint_url...); default: AWS_* env")
    args = p.parse_args(argv)
    from pydantic import ValidationError

    from pipelines.evaluate import (
        EvaluationError,
        EvaluationSpec,
        check_inputs,
        evaluate,
        format_summary,
        write_report,
    )
    from pipelines.cli import option_error, parse_storage_options

    try:
        env, endpoint = options_to_env(parse_storage_options(args.storage_options) or {})
        os.environ.update(env)
        spec = EvaluationSpec(output=args.output, references=args.references,
                              compare=args.compare, report_dir=args.report_dir, n_bins=args.bins,
                              storage_options={"endpoint_url": endpoint} if endpoint else None)
        report = evaluate(spec, check_inputs(spec))
        write_report(report, spec)
    except ValidationError as exc:
        print(f"error: {option_error(exc, {'n_bins': '--bins'})}", file=sys.stderr)
        return 2
    except (ValueError, EvaluationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    coverage = report["coverage"]
    if coverage["references"] and coverage["missing"] == coverage["references"]:
        example = coverage["missing_examples"][0]["source_uri"]
        print(f"error: none of the {coverage['references']} references matched a row of "
              f"{args.output} (e.g. {example!r}): source_uri must name an object as the "
              "output's files/ rows do (the input's s3:// URIs, or local paths), and "
              "segment_index one of its segments", file=sys.stderr)
        return 2
    return 0


def cmd_stack(argv: list[str]) -> int:
    from pipelines import local_stack as stack

    p = argparse.ArgumentParser(prog="kimi-label stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", default=str(DEFAULT_HOME), help="data folder of the stack")
    p.add_argument("--prefect", action="store_true", help="also a Prefect server")
    p.add_argument("--ray", action="store_true", help="also a Ray head node")
    p.add_argument("--s3-port", type=int, default=None,
                   help="port of the S3 endpoint (default: the last one, when free, else a "
                        "free one)")
    args = p.parse_args(argv)
    home = Path(args.home).expanduser()
    try:
        if args.action == "up":
            stack.stack_up(home, prefect=args.prefect, ray=args.ray, s3_port=args.s3_port)
        elif args.action == "down":
            stopped = stack.stack_down(home)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
            return 0
    except stack.StackError as exc:
        print(f"error: stack {args.action}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stack.stack_status(home), indent=2))
    state = stack.StackState.load(home)
    if state is not None and state.services:
        print(f"# environment for clients; the secret key is s3.secret_key in "
              f"{home}/credentials.json:")
        for name in sorted(state.env()):
            if "SECRET" not in name:
                print(f"export {name}={state.env()[name]}")
    return 0


COMMANDS = {  # one line each for `kimi-label --help`; the module docstring shows their usage
    "run": "label every audio object under --input into Parquet (Prefect flow, Ray job)",
    "transcribe-archive": "transcripts (Parquet) and SRT/WebVTT subtitles of every recording",
    "prepare-training-data": "train/validation shards + manifest from a labelled output",
    "stack": "up | down | status of the embedded local stack (SeaweedFS, Prefect, Ray)",
    "evaluate": "score a labelled output against reference labels (table, report.json)",
    "demo": "the main job end to end on embedded defaults (tiny checkpoint, sample audio)",
    "generate": "run message list(s) through the model",
    "audio-tokens": "GLM-4-Voice VQ codes of audio files",
    "label": "label local audio files with tasks in this process (JSON lines)",
    "make-tiny-checkpoint": "a random checkpoint in the official layout",
}


def usage() -> str:
    lines = ["usage: kimi-label COMMAND [options]   (kimi-label COMMAND --help: its options)",
             "", "Label audio with Kimi-Audio: Ray Data jobs run by Prefect flows.", "",
             "commands:"]
    lines += [f"  {name:<22}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # the reader went away (`kimi-label stack status | head`): stop quietly, as a Unix
        # tool killed by SIGPIPE would, not with a traceback (and a second one at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command in ("-h", "--help"):
        print(usage())
        return 0
    if not command:
        print(f"{usage()}\n\nerror: name a command", file=sys.stderr)
        return 2
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (commands: {', '.join(COMMANDS)}; "
              "kimi-label --help describes them)", file=sys.stderr)
        return 2
    # Ctrl-C or SIGTERM (a scheduler's timeout, `kill`): one line and the shell's code for the
    # signal, not a traceback. Noted by our handler, since libraries on the way may turn the
    # KeyboardInterrupt into another exception.
    interrupted: list[int] = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals live there
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, on_signal) for s in stops} if main_thread else {}
    try:
        return _dispatch(command, rest, argv)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            # Ray's driver handler, in place while `ray.init` runs (ours is put back after it:
            # pipelines.job.python_sigterm_kept), exits with the signal's number
            interrupted.append(signal.SIGTERM)
        if not interrupted:
            raise
        print(f"\ninterrupted: kimi-label {command} stopped by "
              f"{signal.Signals(interrupted[0]).name} (a rerun of a labelling run resumes where "
              "it was)", file=sys.stderr)
        # Ray's C++ core can crash in the interpreter's teardown after an interrupted
        # `ray.init` (SIGSEGV, SIGABRT): end here, the stack's clean-up done (`finally`s ran;
        # the temporary Prefect server stops on our death, `start_temporary_server`)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + interrupted[0])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _dispatch(command: str, rest: list[str], argv: list[str]) -> int:
    if command == "run":
        return cmd_run(rest)
    if command == "transcribe-archive":
        return cmd_transcribe_archive(rest)
    if command == "prepare-training-data":
        return cmd_prepare_training_data(rest)
    if command == "stack":
        return cmd_stack(rest)
    if command == "evaluate":
        return cmd_evaluate(rest)
    if command == "demo":
        from flows.demo import main as demo_main

        return demo_main(rest)
    from kimi_ops.__main__ import main as kimi_ops_main

    return kimi_ops_main(argv, prog="kimi-label")


if __name__ == "__main__":
    sys.exit(main())
