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


def kimi_label(*args, env=None):
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], env=env,
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
