"""`kimi-label`: the one console, one argparse dispatcher for every command a user runs.

  kimi-label run | transcribe-archive        a labelling job through its Prefect flow
  kimi-label prepare-training-data | evaluate  what users do with a labelled output
  kimi-label stack up|down|status | demo       the embedded local stack, the demo on it
  kimi-label generate | audio-tokens | label | make-tiny-checkpoint   the model, in process

Exit status: 0 done (a run that labelled some inputs as error rows is done); 1 the run failed
(it started and stopped short: a rerun resumes); 2 a usage error or a refusal before anything
ran (bad options, a pre-flight check, an output another run holds); 128+N stopped by signal N
(130 Ctrl-C, 143 SIGTERM, 141 a closed pipe). Errors are one `error:` line on stderr: the
pipeline's own errors (`pipelines.errors.PipelineError`) and the model's (`KimiError`) are
caught here, in one place; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import metadata

from flows.console.log_level import add_log_level, log_level
from pipelines.errors import Interrupted, PipelineError
from pipelines.interrupts import interrupting_signals

COMMAND_MODULES = ("flows.console.jobs", "flows.console.data", "flows.console.stack")


class _Parser(argparse.ArgumentParser):
    """argparse, except that help written to a reader that went away is a BrokenPipeError
    (`main` ends quietly with 141), not an error argparse swallows on its way to exit 0."""

    def print_help(self, file=None) -> None:
        (file or sys.stdout).write(self.format_help())


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from kimi_ops.__main__ import add_commands

    parser = _Parser(
        prog="kimi-label", description="Label audio with Kimi-Audio: Ray Data jobs run by "
                                       "Prefect flows. `kimi-label COMMAND --help`: its options.",
        epilog="exit status: 0 done, 1 the run failed, 2 usage error or refused before running")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_log_level(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands)
    add_commands(commands, skip=("demo",))
    for command in set(commands.choices.values()):  # also after the command: `run --log-level`
        add_log_level(command, top=False)
    return parser


def version() -> str:
    try:
        return metadata.version("kimi-label")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            code = _main(list(sys.argv[1:] if argv is None else argv))
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader went away (`kimi-label stack status | head`): stop quietly, as a Unix
        # tool killed by SIGPIPE would, not with a traceback (and a second one at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse's line, exit 2
    # Ctrl-C or SIGTERM (a scheduler's timeout, `kill`): one line and the shell's code for the
    # signal, not a traceback. Noted by our handler, since libraries on the way may turn the
    # KeyboardInterrupt into another exception.
    code = 0
    with interrupting_signals() as interrupted:
        try:
            with log_level(args.log_level):
                code = _run(args)
        except BaseException as exc:
            if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
                # Ray's driver handler, in place while `ray.init` runs (ours is put back after
                # it: pipelines.job.ray_cluster.python_sigterm_kept), exits with the signal's
                # number
                interrupted.append(signal.SIGTERM)
            if not interrupted:
                raise
    if interrupted:  # also when a library on the way reported it as a crash and returned
        _end_interrupted(args.command, interrupted[0])
    return code


def _run(args: argparse.Namespace) -> int:
    """The command, its errors caught here: one line and the error's exit code."""
    from kimi_ops.__main__ import run as run_model_command
    from kimi_ops.errors import KimiError

    if not hasattr(args, "run"):  # a model-level command: kimi_ops reports its own errors
        return run_model_command(args)
    try:
        return args.run(args)
    except Interrupted as exc:
        _end_interrupted(args.command, exc.signum)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KimiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _end_interrupted(command: str, signum: int):
    print(f"\ninterrupted: kimi-label {command} stopped by {signal.Signals(signum).name} (a "
          "rerun of a labelling run resumes where it was)", file=sys.stderr)
    # Ray's C++ core can crash in the interpreter's teardown after an interrupted `ray.init`
    # (SIGSEGV, SIGABRT): end here, the clean-up done (`finally`s ran; the temporary Prefect
    # server stops on our death, `flows.console.running.start_temporary_server`)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)
