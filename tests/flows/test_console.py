"""The `kimi-label` console (`flows.console`) as a user types it, in a subprocess: what reaches
the job, and refusals with a one-line reason (exit 2) before Prefect or Ray start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests import goldens

MODEL = str(goldens.CHECKPOINT)


def kimi_label(*args, env=None, module="flows.console"):
    """`kimi-label ARGS`; a None in `env` unsets that variable."""
    base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_USAGE_STATS_ENABLED": "0"}
    base.pop("PREFECT_API_URL", None)  # unless `env` names one: a temporary server
    env = {name: value for name, value in {**base, **(env or {})}.items() if value is not None}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def refused(proc, *expected: str) -> str:
    """The one-line reason of a refusal before any flow run, Ray or model."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "temporary server" not in proc.stderr and "Flow run" not in proc.stderr
    # no Ray started or joined (Ray's own lines)
    assert "Started a local Ray" not in proc.stderr and "Connecting to existing" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


def test_the_flows_take_the_job_spec_and_a_run_id_from_the_flow_run(monkeypatch):
    """The flows' parameters are the job's (`JobSpec`): what is given reaches the job as it is;
    the run id is the flow run's unless the parameters name one; validation is the spec's."""
    import flows.labelling as labelling
    from pipelines.spec import JobSpec

    params = JobSpec(input="/in", output="/out", model=MODEL, glm_tokenizer="/glm",
                     extensions=["wav", "flac"], device="cuda:1", run_id="nightly-1")
    monkeypatch.setattr(labelling, "flow_run_id", lambda: "from-the-flow-run")
    spec = labelling.job_of(params)
    assert (spec.glm_tokenizer, spec.extensions, spec.device) == ("/glm", ["wav", "flac"],
                                                                  "cuda:1")
    assert spec.run_id == "nightly-1"  # an explicit run id wins over the flow run's
    derived = JobSpec(input="/in", output="/out", model=MODEL)
    assert labelling.job_of(derived).run_id == "from-the-flow-run"
    assert derived.extensions is None and derived.device is None
    for field, value, message in (("device", "gpu0", "is not a device"),
                                  ("run_id", "../elsewhere", "names a folder"),
                                  ("run_id", "", "names a folder"),
                                  ("extensions", [" ", "."], "at least one extension")):
        with pytest.raises(ValidationError, match=message):
            JobSpec(input="/in", output="/out", model=MODEL, **{field: value})


SECRET = "s3cr3t-never-printed"
BAD_OPTIONS = [
    (["--storage-options", "[1]"], ["--storage-options must be a JSON object"]),
    (["--storage-options", '{"client_kwargs": "x"}'], ["client_kwargs must be a JSON object"]),
    (["--storage-options", '{"secret": "%s", "key": ' % SECRET],
     ["--storage-options is not valid JSON (Expecting value: line 1 column"]),
    (["--stages", "{bad"], ["--stages is not valid JSON (Expecting property name"]),
    (["--stages", "[1]"], ["--stages must be a JSON object"]),
    (["--stages", '{"labels": {"batch_size": 2}}'],
     ["--stages: unknown stages ['labels'] (known: decode, frontend, label, write)"]),
    (["--stages", '{"input": "/elsewhere"}'], ["--stages: unknown stages ['input']"]),
    (["--stages", '{"label": {"batch_size": 0}}'],
     ["--stages label.batch_size: ", "greater than or equal to 1"]),
    (["--tasks", ""], ["--tasks: name at least one task"]),
]


@pytest.mark.parametrize("args, expected", BAD_OPTIONS)
def test_run_names_the_bad_option(here, tmp_path, args, expected):
    """A malformed option is refused in the command line process, naming the option, before
    the flow starts; a secret in --storage-options is never echoed."""
    line = refused(here("run", "--input", goldens.INPUTS, "--output", tmp_path / "out",
                              "--model", MODEL, *args), *expected)
    assert SECRET not in line
    assert not (tmp_path / "out").exists()


def test_run_names_the_storage_option_behind_a_flow_parameter(here, tmp_path):
    """A field of --storage-options is named by its path in the option."""
    line = refused(here("run", "--input", goldens.INPUTS, "--output", tmp_path / "out",
                              "--model", MODEL, "--storage-options",
                              '{"key": "k", "secret": "%s", "endpoint_url": 5}' % SECRET),
                   "--storage-options endpoint_url: Input should be a valid string")
    assert SECRET not in line


@pytest.mark.parametrize("args, expected", [
    (["--model", "/nonexistent/model"],
     ["label-corpus cannot run: model: /nonexistent/model: checkpoint folder not found"]),
    (["--glm-tokenizer", "/nonexistent/glm"],
     ["model: /nonexistent/glm: GLM-4-Voice tokenizer folder not found"]),
    (["--input", "/nonexistent/audio"], ["not_found: /nonexistent/audio"]),
    (["--tasks", "asr,bogus"], ["tasks: unknown task 'bogus'"]),
    (["--device", "gpu0"], ["--device: 'gpu0' is not a device"]),
    (["--run-id", "a/b"], ["--run-id: 'a/b' must be", "names a folder"]),
    (["--extensions", ","], ["--extensions: name at least one extension"]),
    (["--ray-address", "127.0.0.1:1"], ["cannot reach the Ray cluster at 127.0.0.1:1"]),
    # a store that does not answer: a few seconds of retries, not the job's minute and more
    (["--input", "s3://audio/in", "--storage-options",
      '{"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s"}'],
     ["unavailable: s3://audio/in", "Could not connect", "gave up after 4 attempt(s)"]),
    (["--device", "cuda:3" if torch.cuda.is_available() else "cuda"],
     ["no such device on this machine"]),
])
def test_run_refuses_a_job_that_cannot_run_before_the_flow(here, tmp_path, args, expected):
    """The job's own checks (checkpoint, tasks, input, output) run in the command line process:
    one line, exit 2, no flow run, no temporary Prefect server, no Ray."""
    given = dict(zip(args[::2], args[1::2]))
    base = {"--input": goldens.INPUTS, "--output": tmp_path / "out", "--model": MODEL}
    refused(here("run", *[x for k, v in {**base, **given}.items() for x in (k, v)]),
            *expected)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(here, tmp_path, monkeypatch):
    """`run --dry-run` on a folder of new, labelled, changed, failed and other files: the plan's
    counts and audio from the headers, exit 0, and the output as it was (no table, lease or
    _runs/), Ray never started. `--log-level` is taken after the command too."""
    import pyarrow.parquet as pq
    import ray

    from pipelines.schema import files_schema, to_table
    from pipelines.storage.listing import local_info

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a01_tone_0p5s_16k.wav", "a02_chirp_3s_16k.wav", "a03_speech_12s_16k.wav",
                 "a06_speech_2p37s_16k.flac"):
        shutil.copy(goldens.INPUTS / name, inputs / name)
    (inputs / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    (inputs / "notes.txt").write_text("not audio")
    (inputs / "cover.jpg").write_bytes(b"\xff\xd8")

    def row(name, etag=None, kind=None):
        etag = etag or local_info(str(inputs / name), (inputs / name).stat()).etag
        return {"source_uri": str(inputs / name), "status": "error" if kind else "ok",
                "error": {"kind": kind, "message": "m"} if kind else None, "etag": etag,
                "duration_s": 1.0, "run_id": "earlier"}

    (out / "files").mkdir(parents=True)
    pq.write_table(to_table([row("a01_tone_0p5s_16k.wav"),  # labelled: skipped
                             row("a02_chirp_3s_16k.wav", etag="older"),  # changed since
                             row("a03_speech_12s_16k.wav", kind="unavailable")],  # retried
                            files_schema()), out / "files" / "part-0.parquet")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    done = here("run", "--input", inputs, "--output", out, "--model", MODEL, "--dry-run",
                "--log-level", "debug")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "dry run: nothing was labelled or written",
        f"input {inputs}: 5 audio objects, 2 other objects skipped by extension (1 .jpg, 1 .txt)",
        "  to label: 4 (2 new, 1 changed, 1 earlier errors tried again); already labelled: 1",
        "audio to label: 0:00:17 (0.00483 hours), from the headers of all 4 objects; 1 without "
        "a length in their first 1 MiB (not audio, or broken)",  # 3 + 12 + 2.37 s
        f"output {out}: would write {out}/files/, {out}/segments/ and "
        f"{out}/_runs/<run id>/report.json (run id: a new one when the run starts)"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert "Flow run" not in done.stderr and "temporary server" not in done.stderr

    # an output that is not there yet stays so; a run id given is the one it would write
    new = here("transcribe-archive", "--input", inputs, "--output", tmp_path / "new",
               "--model", MODEL, "--dry-run", "--run-id", "nightly")
    assert new.returncode == 0, new.stderr
    assert "to label: 5 (5 new," in new.stdout and "(run id: nightly)" in new.stdout
    assert f"{tmp_path}/new/_runs/nightly/report.json" in new.stdout
    assert not (tmp_path / "new").exists()


def test_log_level_and_version(here):
    """`--log-level` takes the four levels (any case) and refuses others (exit 2); `--version`
    exits 0 (as a subprocess: test_top_level_help_lists_every_command...)."""
    bad = here("--log-level", "LOUD", "run", "--help")
    assert bad.returncode == 2 and "argument --log-level: invalid choice: 'LOUD'" in bad.stderr
    assert here("run", "--log-level", "verbose", "--help").returncode == 2
    version = here("--log-level", "error", "--version")
    assert version.returncode == 0 and version.stdout.startswith("kimi-label ")


def test_progress_is_a_bar_on_a_terminal_and_sparse_lines_elsewhere():
    """The console's progress (`flows.console.progress`), fed a run's events: off a terminal a
    line at the start, at most one per interval, one at the end; on one a rich bar, during which
    a log handler holding the terminal prints through the bar's console, and after it as before."""
    import io
    import logging

    from flows.console.progress import LineProgress, TerminalProgress, progress_for
    from pipelines.job.progress import ProgressTracker

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    now = [0.0]
    log = io.StringIO()
    lines = LineProgress(log, every_s=30, clock=lambda: now[0])
    assert isinstance(progress_for(log), LineProgress)
    tracker = ProgressTracker("r1", 3, (lines,), clock=lambda: now[0])
    tracker.start()
    for t in (10.0, 20.0, 45.0):  # the third file comes after 30 s: one line for it
        now[0] = t
        tracker.file_done({"status": "ok", "duration_s": 60.0})
    tracker.end(ok=True)
    assert log.getvalue().splitlines() == [
        "progress: run r1: 3 files to label",
        "progress: run r1: 3/3 files, 0:03:00 audio, 0.06 files/s, 3.4x real time, ETA 0:00:00",
        "progress: run r1: completed: 3/3 files, 0:03:00 audio, 0.06 files/s, 3.4x real time, "
        "ETA 0:00:00"]

    screen = Terminal()
    bar = progress_for(screen)
    assert isinstance(bar, TerminalProgress) and bar.replaces_ray_progress
    handler = logging.StreamHandler(screen)
    logger = logging.getLogger("tests.progress_display")
    logger.addHandler(handler)
    try:
        tracker = ProgressTracker("r2", 2, (bar,))
        tracker.start()
        assert handler.stream is not screen  # through the bar's console, above the bar
        logger.warning("a line while the bar is up")
        tracker.file_done({"status": "error", "duration_s": 0.0})
        tracker.end(ok=False)
        assert handler.stream is screen
    finally:
        logger.removeHandler(handler)
    shown = screen.getvalue()
    assert "a line while the bar is up" in shown and "1/2 files" in shown
    assert "━" in shown  # (80 columns: the texts fit, the bar has what is left)


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_run_onto_an_output_of_an_earlier_schema_version_is_refused_and_writes_nothing(
        here, tmp_path, version):
    """An output written before the current schema version (1: map columns; 2: no quality
    signals) is not added to: one line that names it and says what to do, exit 2, the output
    as it was (evaluate and prepare-training-data still read it)."""
    import pyarrow.parquet as pq

    from kimi_ops.tasks import get_task
    from pipelines.schema import files_schema, segments_schema, to_table
    from tests.pipelines.schema_v1 import as_schema_1, as_schema_2

    as_old = {"1": as_schema_1, "2": as_schema_2}[version]

    out = tmp_path / "out"
    tasks = [get_task("asr"), get_task("emotion")]
    for table, row, schema in (
            ("files", {"status": "ok"}, files_schema(tasks)),
            ("segments", {"segment_index": 0, "start_s": 0.0, "end_s": 1.0, "status": "ok",
                          "emotion": "joy", "emotion_scores": {"joy": 0.9, "neutral": 0.1},
                          "task_versions": {"asr": "asr-1", "emotion": "emotion-1"}},
             segments_schema(tasks))):
        (out / table).mkdir(parents=True)
        pq.write_table(as_old(to_table([{"source_uri": "/in/a.wav", "run_id": "r0", **row}],
                                       schema)), out / table / "part-0.parquet")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    refused(here("run", "--input", goldens.INPUTS, "--output", out, "--model", MODEL,
                 "--tasks", "asr,emotion"),
            f"output {out} holds segments of output schema version {version};",
            "label into a new output")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


ALL_COMMANDS = ["run", "transcribe-archive", "prepare-training-data", "stack", "evaluate", "demo",
                "generate", "audio-tokens", "label", "make-tiny-checkpoint"]


def test_top_level_help_lists_every_command_and_an_unknown_one_is_refused(here):
    helped = kimi_label("--help")  # the installed entry point; the rest in this process
    assert helped.returncode == 0 and "python -m kimi_ops" not in helped.stdout
    listed = {line.split()[0] for line in helped.stdout.splitlines()
              if line.startswith("    ") and line[4] != " "}
    assert listed == set(ALL_COMMANDS)
    assert "exit status: 0 done, 1 the run failed, 2 usage error" in helped.stdout
    version = here("--version")
    assert version.returncode == 0 and version.stdout.startswith("kimi-label ")
    bare = here()
    assert bare.returncode == 2 and "required: COMMAND" in bare.stderr
    unknown = here("bogus")
    assert unknown.returncode == 2 and "invalid choice: 'bogus'" in unknown.stderr
    assert all(f"'{c}'" in unknown.stderr for c in ALL_COMMANDS)
    # each command keeps its own help; the model commands still reach kimi_ops
    run_help = here("run", "--help")
    assert run_help.returncode == 0 and "credentials_block" in run_help.stdout
    assert "comma-separated: asr, caption, emotion, scene" in " ".join(run_help.stdout.split())
    options = [line.split()[0] for line in run_help.stdout.split("options:")[1].splitlines()
               if line.startswith("  -")]
    helped = run_help.stdout.split("options:")[1]
    for option in options:  # every option says what it is: text on its line or the next
        lines = helped.split(f"  {option}", 1)[1].splitlines()
        assert lines[0].strip(" ,").split(maxsplit=1)[1:] or lines[1].startswith(" " * 10), option
    archive_help = here("transcribe-archive", "--help")
    assert archive_help.returncode == 0 and "--piece-seconds" in archive_help.stdout
    assert "--tasks" not in archive_help.stdout  # asr only: the flow's parameters, no more
    training_help = here("prepare-training-data", "--help")
    assert training_help.returncode == 0 and "--filters" in training_help.stdout
    generate_help = here("generate", "--help")
    assert generate_help.returncode == 0 and "--messages" in generate_help.stdout
    assert generate_help.stdout.startswith("usage: kimi-label generate ")


def help_of(command: str) -> str:
    """`kimi-label COMMAND --help`, its lines unwrapped (an option's help on one line)."""
    import re

    from flows.console.app import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    sub.formatter_class = lambda prog: __import__("argparse").HelpFormatter(prog, width=10_000)
    return re.sub(r"\s+", " ", sub.format_help())


def test_every_job_parameter_is_an_option_with_its_default_and_a_flow_parameter():
    """One definition: each field of the job's spec is a `kimi-label run` option whose help
    shows the field's default, and a parameter of the label-corpus flow with that default
    (transcribe-archive: the same, less the fields it fixes, with its own token budget)."""
    from flows.console.options import flag, shown_default
    from flows.label_corpus import label_corpus
    from flows.transcribe_archive import transcribe_archive
    from pipelines.spec import JobSpec, TranscribeArchiveSpec

    for command, spec, flow in (("run", JobSpec, label_corpus),
                                ("transcribe-archive", TranscribeArchiveSpec, transcribe_archive)):
        text = help_of(command)
        schema = flow.parameters.model_dump()
        definitions = schema["definitions"][spec.__name__]["properties"]
        skipped = getattr(spec, "FIXED", ())
        for name, field in spec.model_fields.items():
            if field.exclude:
                continue
            assert name in definitions, (command, name)
            if name in skipped:
                assert f"{flag(name)} " not in text, (command, name)
                continue
            assert f"{flag(name)} " in text, (command, name)
            if field.is_required():
                assert name in schema["definitions"][spec.__name__]["required"]
                continue
            assert f"(default: {shown_default(field)})" in text, (command, name)
            if isinstance(field.default, (bool, int, float, str)):  # (None: no default shown)
                assert definitions[name]["default"] == field.default, (command, name)
    assert "(default: 384)" in help_of("transcribe-archive")
    assert "(default: 256)" in help_of("run")


@pytest.mark.parametrize("command", ["run", "transcribe-archive"])
def test_a_run_id_that_is_not_a_folder_name_writes_nothing(tmp_path, command, harness):
    """`--run-id ../../escape` once wrote `escape/lease.json` outside the output: every job
    entry point refuses it where the spec is made, before anything is written."""
    from flows.label_corpus import label_corpus
    from pipelines.spec import JobSpec

    out = tmp_path / "a" / "b" / "out"
    line = refused(kimi_label(command, "--input", goldens.INPUTS, "--output", out,
                              "--model", MODEL, "--run-id", "../../escape"),
                   "--run-id: '../../escape' must be")
    assert "names a folder" in line
    assert list(tmp_path.rglob("*")) == []
    with pytest.raises(ValidationError, match="names a folder"):  # the job, as a library
        JobSpec(input=str(goldens.INPUTS), output=str(out), model=MODEL, run_id="../../escape")
    state = label_corpus({"input": str(goldens.INPUTS), "output": str(out), "model": MODEL,
                          "run_id": "../../escape"}, return_state=True)  # a deployment's run
    assert state.is_failed() and "names a folder" in str(state.result(raise_on_failure=False))
    assert list(tmp_path.rglob("*")) == []


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`kimi-label ... | head`: output to a pipe nobody reads any more ends the command as a Unix
    tool killed by SIGPIPE would (128 + 13), with no traceback."""
    clip = goldens.INPUTS / "a01_tone_0p5s_16k.wav"
    for args in (["--help"], ["audio-tokens", "--model", MODEL, clip]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line
        try:
            proc = subprocess.run([sys.executable, "-m", "flows.console", *map(str, args)],
                                  stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                                  check=False)
        finally:
            os.close(write)
        assert proc.returncode == 141, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, args


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    """One PREFECT_HOME for the temporary servers of the signal tests (signalled once up): its
    database is migrated once, as a user's ~/.prefect is, not at every start."""
    return str(tmp_path_factory.mktemp("prefect"))


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT while `kimi-label run` starts its temporary Prefect server: a line, not a
    traceback, the shell's 130, and the server stopped with it."""
    import signal

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.console", "run", "--input", str(goldens.INPUTS),
         "--output", str(tmp_path / "out"), "--model", MODEL, "--tasks", "asr"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # wait until the server is starting, then interrupt
        seen.append(line)
        if "Starting temporary server" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(seen) + rest
    assert "Traceback" not in rest and "interrupted: kimi-label run stopped" in rest
    assert not (tmp_path / "out" / "files").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum, whole_group, joins", [
    ("SIGINT", True, False),  # a terminal's Ctrl-C: the command's whole process group
    ("SIGTERM", False, True),  # a scheduler's timeout, `kill`
    ("SIGKILL", False, True),  # the OOM killer
])
def test_a_signal_during_the_job_stops_the_command_and_its_temporary_server(
        tmp_path, prefect_home, request, signum, whole_group, joins):
    """Signalled while its Ray job runs, `kimi-label run` exits within seconds, with one line
    and 128 + the signal where it can; the temporary Prefect server it started stops too (it
    runs in its own session, so Ctrl-C does not take it down under the run reporting its
    crash, and dies with the command). Ctrl-C comes as the job's own local Ray has just
    started (the touchiest moment: its driver half set up); the others while a job that joined
    a running Ray (the session's) starts its stages."""
    import re
    import signal
    import socket
    import time

    import numpy as np
    import soundfile as sf

    # (the session's Ray first: joining it takes the environment it set up)
    ray = ["--ray-address", request.getfixturevalue("ray_address")] if joins else []
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(24):  # enough work to be mid-job when the signal comes
        sf.write(inputs / f"c{i:02d}.wav", np.zeros(16000 * 6, np.float32) + 0.01, 16000)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_HOME": prefect_home}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.console", "run", "--input", str(inputs),
         "--output", str(tmp_path / "out"), "--model", MODEL, "--max-new-tokens", "8", *ray],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    seen, port = [], None
    ready = "Connected to Ray cluster" if joins else "Started a local Ray instance"
    for line in proc.stderr:
        seen.append(line)
        port = port or next(iter(re.findall(r"temporary server on http://127.0.0.1:(\d+)", line)),
                            None)
        if ready in line:
            break
    assert port and proc.poll() is None, "".join(seen)
    time.sleep(0.3)
    sig = getattr(signal, signum)
    signalled = time.monotonic()
    if whole_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    rest = proc.stderr.read()
    code = proc.wait(timeout=60)
    assert time.monotonic() - signalled < 30, rest
    if signum != "SIGKILL":
        assert code == 128 + sig, rest
        assert f"interrupted: kimi-label run stopped by {signum}" in rest
        assert "Traceback" not in rest and "Aborted" not in rest
    while True:  # the server is gone (nothing listens on its port) within seconds
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", int(port))):
                break
        assert time.monotonic() - signalled < 40, f"temporary server on {port} still runs"
        time.sleep(0.5)


# -- transcribe-archive and prepare-training-data --------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--model", "/nonexistent/model"],
     ["transcribe-archive cannot run: model: /nonexistent/model: checkpoint folder not found"]),
    (["--input", "/nonexistent/audio"],
     ["transcribe-archive cannot run: not_found: /nonexistent/audio"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens: ", "greater than or equal to 1"]),
    (["--piece-seconds", "10"], ["--piece-seconds: ", "greater than or equal to 30"]),
    (["--stages", '{"labels": {"batch_size": 2}}'], ["--stages: unknown stages ['labels']"]),
    (["--stages", '{"label": {"batch_size": 0}}'], ["--stages label.batch_size: "]),
    (["--storage-options", '{"secret": "%s", "key": ' % SECRET],
     ["--storage-options is not valid JSON"]),
    (["--storage-options", '{"key": "k", "secret": "%s", "endpoint_url": 5}' % SECRET],
     ["--storage-options endpoint_url: Input should be a valid string"]),
])
def test_transcribe_archive_refuses_before_the_flow(here, tmp_path, args, expected):
    """The flow's parameters and the job's own checks, in the command line process: one line,
    exit 2, no flow run, no temporary Prefect server, no Ray; never the secret."""
    given = dict(zip(args[::2], args[1::2]))
    base = {"--input": goldens.INPUTS, "--output": tmp_path / "out", "--model": MODEL}
    line = refused(here("transcribe-archive",
                              *[x for k, v in {**base, **given}.items() for x in (k, v)]),
                   *expected)
    assert SECRET not in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    """A hand-made labelled output with semantic tokens and emotion/scene columns."""
    from tests.pipelines.test_training_data import make_output

    return make_output(tmp_path_factory.mktemp("labelled") / "out")


@pytest.fixture(scope="module")
def older(labelled, tmp_path_factory) -> str:
    """`labelled` as output schema version 2 wrote it: no quality signals."""
    from tests.pipelines.schema_v1 import copy_in_schema

    return copy_in_schema(labelled, tmp_path_factory.mktemp("older") / "out", 2)


@pytest.mark.parametrize("args, expected", [
    (["--input", "{tmp}/nowhere"], ["is not a labelled output: no Parquet shards under files/"]),
    (["--output", "{source}/segments/train"], ["output must differ from the input"]),
    (["--output", "{built}"], ["already holds a build (manifest.json); pass --overwrite"]),
    (["--filters", '{"min_confidence": {"bogus": 0.5}}'],
     ["min_confidence names ['bogus'], not closed-set tasks"]),
    (["--filters", '{"min_duration_s": -1}'], ["--filters min_duration_s: ", "greater than"]),
    (["--filters", '{"drop_truncated": false, "bogus": 1}'], ["--filters bogus: Extra inputs"]),
    (["--filters", "[1]"], ["--filters must be a JSON object"]),
    (["--validation-fraction", "1.5"], ["--validation-fraction: ", "less than or equal to 1"]),
    (["--rows-per-shard", "0"], ["--rows-per-shard: ", "greater than or equal to 1"]),
    (["--formats", "hf,tar"], ["--formats: unknown format 'tar'; the formats are webdataset, "
                               "lhotse, hf"]),
    (["--storage-options", '{"secret": "%s", "key": ' % SECRET],
     ["--storage-options is not valid JSON"]),
    # the quality-signal filters, options of their own too: given both ways, refused
    (["--min-avg-logprob", "-1.0", "--filters", '{"min_avg_logprob": -2, "min_duration_s": 1}'],
     ["error: --min-avg-logprob and --filters' min_avg_logprob are both given; give one"]),
    (["--min-avg-logprob", "0.5"], ["error: --min-avg-logprob: ", "less than or equal to 0"]),
    (["--filters", '{"min_avg_logprob": 0.5}'], ["--filters min_avg_logprob: "]),
    (["--max-compression-ratio", "many"], ["error: --max-compression-ratio: ", "valid number"]),
    (["--min-speech-ratio", "0.5", "--input", "{older}"],  # labelled before the signals
     ["error: min_speech_ratio: the segments of ", " have no speech_ratio column"]),
    (["--filters", '{"min_avg_logprob": -1}', "--input", "{older}"],
     [" have no transcript_avg_logprob column"]),
])
def test_prepare_training_data_refuses_before_the_flow(here, labelled, older, tmp_path, args,
                                                       expected):
    """The flow's parameters, its source check and a destination holding a build, in the
    command line process: one line, exit 2, no flow run; never the secret."""
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "manifest.json").write_text("{}")
    places = {"{tmp}": str(tmp_path), "{source}": labelled, "{built}": str(tmp_path / "built"),
              "{older}": older}

    def placed(value: str) -> str:  # a leading {place} (not str.format: JSON has braces)
        head, sep, rest = value.partition("/")
        return places.get(head, head) + sep + rest

    given = {k: placed(v) for k, v in zip(args[::2], args[1::2])}
    base = {"--input": labelled, "--output": tmp_path / "ds"}
    line = refused(here("prepare-training-data",
                              *[x for k, v in {**base, **given}.items() for x in (k, v)]),
                   *expected)
    assert SECRET not in line
    assert not (tmp_path / "ds").exists()
    assert (tmp_path / "built" / "manifest.json").read_text() == "{}"


def test_signal_filters_are_options_derived_from_the_filters_fields():
    """--min-avg-logprob, --max-compression-ratio, --min-speech-ratio: the TrainingFilters
    fields (their description and default as help), merged with the other keys of
    --filters."""
    from flows.console.app import build_parser
    from flows.console.options import flag, help_text, model_from_args
    from pipelines.training_data import FILTER_OPTIONS, TrainingDataSpec, TrainingFilters

    args = build_parser().parse_args([
        "prepare-training-data", "--input", "/in", "--output", "/ds", "--min-avg-logprob",
        "-1.5", "--max-compression-ratio", "2.4", "--filters", '{"min_duration_s": 1.0}'])
    assert model_from_args(TrainingDataSpec, args).filters == TrainingFilters(
        min_duration_s=1.0, min_avg_logprob=-1.5, max_compression_ratio=2.4)
    text = help_of("prepare-training-data")
    for name in FILTER_OPTIONS:
        field = TrainingFilters.model_fields[name]
        assert f"{flag(name)} {name.upper()} {help_text(field)}" in text
        assert "(default: none)" in help_text(field)
        assert name in TrainingDataSpec.model_fields["filters"].description  # --filters' keys


def server_env() -> dict[str, str]:
    """The session's Prefect server (the harness's), as a user with a server has: each command
    skips starting a temporary server of its own (the signal tests and
    tests/flows/test_label_corpus.py take that path)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.mark.slow
def test_transcribe_archive_command_writes_tables_and_subtitles(harness, ray_address, here,
                                                               tmp_path):
    """`kimi-label transcribe-archive` end to end: the flow on a local Ray and the tiny
    checkpoint; its summary names the run and the subtitles folder."""
    import shutil

    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "archive").mkdir(parents=True)
    shutil.copy(goldens.INPUTS / "a02_chirp_3s_16k.wav", inputs)
    shutil.copy(goldens.INPUTS / "a06_speech_2p37s_16k.flac", inputs / "archive")
    done = kimi_label("transcribe-archive", "--input", inputs, "--output", f"{out}/",
                      "--model", MODEL, "--max-new-tokens", "4", "--language", "en",
                      "--ray-address", ray_address, env=server_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "telemetry" not in done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("run ") and ": 2 processed (0 already done)" in lines[0]
    assert f"output: {out}/files/ and {out}/segments/" in done.stdout
    assert lines[-1].startswith("subtitles: 4 files (.srt, .vtt) for 2 recordings of this run (")
    assert lines[-1].endswith(f" in {out}/subtitles/")  # no `out//`
    assert list((out / "files").glob("part-*.parquet"))
    assert list((out / "segments").glob("part-*.parquet"))
    for name in ("a02_chirp_3s_16k.wav", "archive/a06_speech_2p37s_16k.flac"):
        assert (out / "subtitles" / f"{name}.srt").is_file()
        assert (out / "subtitles" / f"{name}.vtt").read_text().startswith("WEBVTT")

    # the transcripts carry no semantic tokens: no training data from them, said up front
    refused(here("prepare-training-data", "--input", out, "--output", tmp_path / "ds"),
            "no semantic_tokens column", "--semantic-tokens")


@pytest.mark.slow
def test_prepare_training_data_command_builds_shards_and_manifest(harness, ray_address, here,
                                                                 tmp_path):
    """`kimi-label prepare-training-data` end to end on a real labelled output made with
    --semantic-tokens, in every format (the default), then refused in one line as a rerun
    into the same destination."""
    import gzip
    import json
    import shutil
    from collections import Counter

    import pyarrow.parquet as pq
    import soundfile as sf

    from pipelines.training_data import shard_counts

    inputs, out, ds = tmp_path / "in", tmp_path / "out", tmp_path / "ds"
    inputs.mkdir()
    shutil.copy(goldens.INPUTS / "a02_chirp_3s_16k.wav", inputs)
    shutil.copy(goldens.INPUTS / "a06_speech_2p37s_16k.flac", inputs)
    labelled_run = kimi_label("run", "--input", inputs, "--output", out, "--model", MODEL,
                              "--tasks", "asr,emotion", "--language", "en",
                              "--max-new-tokens", "4", "--semantic-tokens",
                              "--ray-address", ray_address, env=server_env())
    assert labelled_run.returncode == 0, labelled_run.stderr[-3000:]
    segments = pq.read_table(out / "segments").to_pylist()
    ok = [s for s in segments if s["status"] == "ok" and s["semantic_tokens"]]
    assert ok

    # 4 new tokens truncate every transcript: keep those rows, so that there is data
    args = ["prepare-training-data", "--input", out, "--output", ds,
            "--filters", '{"drop_truncated": false, "drop_looped": false}',
            "--rows-per-shard", "1"]
    done = kimi_label(*args, env=server_env())
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((ds / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input_segments"] == len(segments) and counts["kept"] == len(ok)
    assert "source_changed" not in counts["dropped"]  # the listing's etags, read again
    assert manifest["tasks"] == ["emotion"]
    splits = [s for s, st in counts["splits"].items() if st["rows"]]
    assert Counter(s["format"] for s in manifest["shards"]) == {  # a shard of each per row
        "parquet": len(ok), "webdataset": len(ok), "hf": len(ok), "lhotse-audio": len(ok),
        "lhotse": 2 * len(splits)}
    for shard in manifest["shards"]:
        assert (ds / shard["path"]).exists()
    by_place = {(s["source_uri"], s["segment_index"]): s for s in ok}
    for split in splits:
        for line in gzip.decompress((ds / "lhotse" / f"supervisions_{split}.jsonl.gz")
                                    .read_bytes()).splitlines():
            sup = json.loads(line)
            segment = by_place.pop((sup["custom"]["source_uri"], sup["custom"]["segment_index"]))
            assert (sup["text"], sup["language"], sup["custom"]["emotion"]) \
                == (segment["transcript"], "en", segment["emotion"])
            assert sup["custom"]["semantic_tokens"] == segment["semantic_tokens"]
            (flac,) = ds.glob(f"lhotse/audio/{split}-*/{sup['id']}.flac")
            assert sf.info(flac).frames == round(segment["end_s"] * 16000) \
                - round(segment["start_s"] * 16000)
    assert not by_place
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"kept {len(ok)} of {len(segments)} segments: train ")
    assert lines[1] == f"shards: {shard_counts(manifest)} under {ds}/"
    assert lines[2] == f"manifest: {ds}/manifest.json"

    again = refused(here(*args), "already holds a build", "--overwrite")
    assert str(ds) in again


def test_the_printed_summary_counts_retried_errors_and_keeps_paths_clean():
    from pipelines.job import format_report

    report = {"run_id": "r1", "processed": 3, "planned": {"already_done": 5,
                                                         "retried_errors": 2},
              "status": {"ok": 3}, "errors_by_kind": {}, "audio_hours": 0.01, "wall_s": 9.0,
              "audio_hours_per_hour": 4.0, "output": "s3://audio/labels/"}
    first, _, paths = format_report(report).splitlines()
    assert "3 processed (5 already done, 2 earlier errors tried again)" in first
    assert paths.startswith("output: s3://audio/labels/files/ and s3://audio/labels/segments/")
    report["planned"] = {"already_done": 5}
    assert "(5 already done)" in format_report(report)
    from flows.console.jobs import format_transcription

    report["subtitles"] = {"subtitle_files": 6, "recordings": 1, "segments": 4, "recovered": 2,
                           "subtitle_files_removed": 0, "subtitles_dir": "s3://audio/labels/sub"}
    assert format_transcription(report).splitlines()[-1] == (
        "subtitles: 6 files (.srt, .vtt) for 1 recordings of this run (4 segments) and 2 of "
        "earlier runs whose files were missing or stale in s3://audio/labels/sub")


def test_a_temporary_server_too_slow_to_start_is_one_line_and_goes_away(tmp_path):
    """A temporary Prefect server that does not answer in time (here: a 1 s limit the user set)
    ends the command with one line and exit 2, and the server does not outlive it."""
    import re
    import socket
    import time

    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "flows.console", "run", "--input", goldens.INPUTS,
                           "--output", tmp_path / "out", "--model", MODEL], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the temporary Prefect server did not answer within 1 s (PREFECT_SERVER_"
        "EPHEMERAL_STARTUP_TIMEOUT_SECONDS): start a server (`kimi-label stack up --prefect`) "
        "and set PREFECT_API_URL to it"]
    port = int(re.search(r"temporary server on http://127.0.0.1:(\d+)", proc.stderr)[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the temporary server still answers on {port}")
    assert not list((tmp_path / "out").rglob("*"))  # the pre-flight's folder, empty


def test_a_prefect_api_that_does_not_answer_is_one_line(tmp_path):
    """PREFECT_API_URL left pointing at a stopped server: one line and exit 2 in seconds, not
    Prefect's retries ending in a page of tracebacks."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = subprocess.run([sys.executable, "-m", "flows.console", "run", "--input", goldens.INPUTS,
                           "--output", tmp_path / "out", "--model", MODEL], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the Prefect API at http://127.0.0.1:{port}/api (PREFECT_API_URL) does not "
        "answer (ConnectError: [Errno 111] Connection refused): start it (`kimi-label stack "
        "up --prefect`), or unset "
        "PREFECT_API_URL to run with a temporary server")
    assert not (tmp_path / "out").exists()

    # an HTTP server that is not Prefect (here: a plain one answering 501)
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api"
        proc = subprocess.run([sys.executable, "-m", "flows.console", "run", "--input",
                               goldens.INPUTS, "--output", tmp_path / "out", "--model", MODEL],
                              env={**env, "PREFECT_API_URL": url}, capture_output=True,
                              text=True, timeout=120, check=False)
    finally:
        server.shutdown()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the Prefect API at {url} (PREFECT_API_URL) answers HTTP 501 for /health: not a "
        "Prefect API, or it refuses this client (PREFECT_API_KEY)")


def test_a_relative_model_folder_becomes_absolute_for_the_actors(monkeypatch):
    """Actors run in another working directory (or on other nodes): `--model ck` from here
    must reach them as this folder's absolute path; a hub id stays one."""
    from pipelines.job import JobSpec

    monkeypatch.chdir(goldens.CHECKPOINT.parent)
    spec = JobSpec(input="x", output="y", model=goldens.CHECKPOINT.name,
                   glm_tokenizer=f"./{goldens.CHECKPOINT.name}/glm-4-voice-tokenizer")
    here = goldens.CHECKPOINT.resolve()  # (the working directory is the folder's real path)
    assert spec.model == str(here)
    assert spec.glm_tokenizer == str(here / "glm-4-voice-tokenizer")
    assert JobSpec(input="x", output="y", model="moonshotai/Kimi-Audio-7B-Instruct").model == (
        "moonshotai/Kimi-Audio-7B-Instruct")
    # so do a local input and output (the output of a job on a joined cluster landed in the
    # head's working directory); URIs stay as they are
    local = JobSpec(input="in", output="~/out", model="m")
    assert (local.input, local.output) == (str(here.parent / "in"), str(Path.home() / "out"))
    remote = JobSpec(input="s3://b/in", output="s3://b/out", model="m")
    assert (remote.input, remote.output) == ("s3://b/in", "s3://b/out")


def test_ray_addresses_that_are_urls_are_refused_before_the_flow():
    """The dashboard's http:// URL is a common slip (the flow found it out 40 s and a page of
    tracebacks later); a ray:// (Ray Client) address is retired: jobs go to a remote cluster
    through its Jobs API."""
    from pipelines.job import JobError
    from pipelines.job.ray_cluster import check_ray_address

    with pytest.raises(JobError, match=r"not a URL \(http://...:8265 is the dashboard: "
                                       r"submit to it with the label-corpus-on-ray flow\)"):
        check_ray_address("http://127.0.0.1:8265")
    with pytest.raises(JobError, match=r"Ray Client is not supported; submit the job to the "
                                       r"cluster through its Ray Jobs API instead"):
        check_ray_address("ray://127.0.0.1:10001")


# -- what reaches the model ------------------------------------------------------------------

@pytest.mark.slow
def test_run_sends_a_noisy_recordings_speech_to_asr_and_keeps_its_noise_out(harness, ray_address,
                                                                           tmp_path):
    """An archive recording (60 s, three utterances in steady noise at -32 dBFS) through
    `kimi-label run --tasks asr`: by voice activity (the default) at least 95 % of the speech
    time is in `ok` segments and at most 20 % of the noise-only time; the rest is `silent`."""
    import pyarrow.parquet as pq
    import soundfile as sf

    from tests.bench_modules import bench_module

    mix = bench_module("speech").archive_fixture()
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "archive.flac", mix.wave, 16000)
    done = kimi_label("run", "--input", tmp_path / "in", "--output", tmp_path / "out",
                      "--model", MODEL, "--tasks", "asr", "--max-new-tokens", "24",
                      "--ray-address", ray_address, env=server_env())
    assert done.returncode == 0, done.stderr[-3000:]
    segments = pq.read_table(tmp_path / "out" / "segments").to_pylist()
    ok = [(round(s["start_s"] * 16000), round(s["end_s"] * 16000)) for s in segments
          if s["status"] == "ok"]  # the shares of speech and of all non-speech time in them
    speech, noise = bench_module("segmentation").sent_shares(len(mix.wave), ok, mix.speech,
                                                             margin_s=0.0)
    assert speech >= 0.95 and noise <= 0.20, (speech, noise)
    assert {s["status"] for s in segments} == {"ok", "silent"}
    assert all(0.0 <= s["speech_ratio"] <= 1.0 for s in segments)
    assert '"segmenter": "vad"' in segments[0]["generation"]
    for s in segments:  # how far to trust each transcript, where the model wrote one
        if s["status"] == "ok":
            assert s["transcript_min_logprob"] <= s["transcript_avg_logprob"] <= 0, s
            assert s["transcript_compression_ratio"] > 0, s
        else:
            assert s["transcript_avg_logprob"] is None and s["speech_ratio"] < 0.05, s
