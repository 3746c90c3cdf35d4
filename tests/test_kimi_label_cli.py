"""The `kimi-label` command line (`flows.cli`) as a user types it, in a subprocess: what reaches
the job, and refusals with a one-line reason (exit 2) before Prefect or Ray start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from tests import goldens

MODEL = str(goldens.CHECKPOINT)


def kimi_label(*args, env=None, module="flows.cli"):
    """`kimi-label ARGS` (`pipelines.cli`: the bare job's command line, no Prefect)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def refused(proc, *expected: str) -> str:
    """The one-line reason of a refusal before any flow run, Ray or model."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "temporary server" not in proc.stderr and "Flow run" not in proc.stderr
    assert "Ray" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


def test_label_corpus_params_reach_the_job_spec():
    from flows.label_corpus import LabelCorpusParams

    params = LabelCorpusParams(input="/in", output="/out", model=MODEL, glm_tokenizer="/glm",
                               extensions=["wav", "flac"], device="cuda:1", run_id="nightly-1")
    spec = params.job_spec(run_id="from-the-flow-run")
    assert (spec.glm_tokenizer, spec.extensions, spec.device) == ("/glm", ["wav", "flac"],
                                                                  "cuda:1")
    assert spec.run_id == "nightly-1"  # an explicit run id wins over the flow run's
    derived = LabelCorpusParams(input="/in", output="/out", model=MODEL)
    assert derived.job_spec(run_id="from-the-flow-run").run_id == "from-the-flow-run"
    assert derived.job_spec().extensions is None and derived.job_spec().device is None
    for field, value, message in (("device", "gpu0", "is not a device"),
                                  ("run_id", "../elsewhere", "names a folder"),
                                  ("run_id", "", "names a folder"),
                                  ("extensions", [" ", "."], "at least one extension")):
        with pytest.raises(ValidationError, match=message):
            LabelCorpusParams(input="/in", output="/out", model=MODEL, **{field: value})


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
    (["--stages", '{"label": {"batch_size": 0}}'], ["--stages label.batch_size: ", "greater than or equal to 1"]),
    (["--tasks", ""], ["--tasks: name at least one task"]),
]


@pytest.mark.parametrize("module", ["flows.cli", "pipelines.cli"])
@pytest.mark.parametrize("args, expected", BAD_OPTIONS)
def test_run_names_the_bad_option(tmp_path, module, args, expected):
    """A malformed option is refused in the command line process, naming the option, before
    the flow (or the job) starts; a secret in --storage-options is never echoed."""
    line = refused(kimi_label("run", "--input", goldens.INPUTS, "--output", tmp_path / "out",
                              "--model", MODEL, *args, module=module), *expected)
    assert SECRET not in line
    assert not (tmp_path / "out").exists()


def test_run_names_the_storage_option_behind_a_flow_parameter(tmp_path):
    """kimi-label run passes the endpoint of --storage-options on as the flow's endpoint_url."""
    line = refused(kimi_label("run", "--input", goldens.INPUTS, "--output", tmp_path / "out",
                              "--model", MODEL, "--storage-options",
                              '{"secret": "%s", "endpoint_url": 5}' % SECRET),
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
])
def test_run_refuses_a_job_that_cannot_run_before_the_flow(tmp_path, args, expected):
    """The job's own checks (checkpoint, tasks, input, output) run in the command line process:
    one line, exit 2, no flow run, no temporary Prefect server, no Ray."""
    given = dict(zip(args[::2], args[1::2]))
    base = {"--input": goldens.INPUTS, "--output": tmp_path / "out", "--model": MODEL}
    refused(kimi_label("run", *[x for k, v in {**base, **given}.items() for x in (k, v)]),
            *expected)
    assert not (tmp_path / "out").exists()


def test_with_a_credentials_block_the_storage_checks_wait_for_the_flow(tmp_path):
    """The block's credentials are read when the flow runs: before it, only the tasks and the
    checkpoint can be checked."""
    from flows.cli import check_job
    from flows.label_corpus import LabelCorpusParams
    from pipelines.job import JobError

    params = LabelCorpusParams(input="s3://no-bucket/in", output="s3://no-bucket/out",
                               model=MODEL, credentials_block="s3-creds")
    check_job(params.job_spec(), storage=False)
    with pytest.raises(JobError, match="checkpoint folder not found"):
        check_job(params.model_copy(update={"model": str(tmp_path / "no")}).job_spec(),
                  storage=False)
    with pytest.raises(JobError, match="unknown task 'bogus'"):
        check_job(params.model_copy(update={"tasks": ["bogus"]}).job_spec(), storage=False)
    with pytest.raises(JobError, match="not_found"):
        check_job(params.model_copy(update={"input": str(tmp_path / "no")}).job_spec())


ALL_COMMANDS = ["run", "stack", "evaluate", "demo", "generate", "audio-tokens", "label",
                "make-tiny-checkpoint"]


def test_top_level_help_lists_every_command_and_an_unknown_one_is_refused():
    helped = kimi_label("--help")
    assert helped.returncode == 0 and "python -m kimi_ops" not in helped.stdout
    listed = {line.split()[0] for line in helped.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(ALL_COMMANDS)
    bare = kimi_label()
    assert bare.returncode == 2 and all(f"  {c} " in bare.stderr for c in ALL_COMMANDS)
    line = refused(kimi_label("bogus"), "unknown command 'bogus'")
    assert all(c in line for c in ALL_COMMANDS)
    # each command keeps its own help; the model commands still reach kimi_ops
    run_help = kimi_label("run", "--help")
    assert run_help.returncode == 0 and "--credentials-block" in run_help.stdout
    generate_help = kimi_label("generate", "--help")
    assert generate_help.returncode == 0 and "--messages" in generate_help.stdout
    assert generate_help.stdout.startswith("usage: kimi-label generate ")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT while `kimi-label run` starts its temporary Prefect server: a line, not a
    traceback, the shell's 130, and the server stopped with it."""
    import signal

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--input", str(goldens.INPUTS),
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
