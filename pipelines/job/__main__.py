"""``python -m pipelines.job --spec JSON``: run one labelling job in this process, on the Ray
cluster it runs on (a job submitted through the Ray Jobs API, `pipelines.job.submit`, or a
KubeRay RayJob's entrypoint); no Prefect.

The spec is a `JobSpec` as JSON, validated as every entry point validates it. Credentials come
from the AWS_* environment (a submitted job's runtime_env), never from the command line. The
report's three lines go to stdout; a failure is one `error:` line on stderr and the exit status
of `pipelines.errors` (2 refused before anything ran, 1 the run failed, 128 + N on signal N,
SIGTERM being how Ray stops a job; the output's lease is released on the way out).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError

from pipelines.errors import ConfigError, PipelineError
from pipelines.interrupts import interrupting_signals
from pipelines.job.report import format_report
from pipelines.job.run import run_job
from pipelines.spec import JobSpec


def parse_spec(text: str) -> JobSpec:
    """The job of `--spec`; a ConfigError naming each field that is wrong."""
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"--spec is not a valid job: {problems}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="the job: JobSpec as JSON")
    args = parser.parse_args(argv)
    # so that `finally`s run (the output's lease is released)
    with interrupting_signals() as signals:
        try:
            spec = parse_spec(args.spec)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s "
                                                           "%(name)s: %(message)s")
            report = run_job(spec)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        except KeyboardInterrupt:
            signum = signals[0] if signals else signal.SIGINT
            print(f"error: stopped by {signal.Signals(signum).name} (a rerun resumes where it "
                  "was)", file=sys.stderr, flush=True)
            return 128 + signum
    print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
