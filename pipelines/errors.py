"""The exception family of the pipeline layer (`pipelines`, and `flows` above it).

Every error a user can act on is a `PipelineError`: its message is the whole story for a user
(it names the input, option or service and the reason, never a secret), `kind` is a stable,
machine-readable string, and `exit_code` is what the console returns for it:

  2  refused before anything ran: bad options, a pre-flight check, an output another run holds
  1  the run started and failed (the store stayed down past its retry budget, a flow failed)

The console (`flows.console`) catches the family in one place. Per-input failures are not
exceptions that escape: they become error rows (their kinds come from `kimi_ops.errors` and
`StorageError.KINDS`); whether such a failure is decided by the object's bytes comes from the
exception class (`kimi_ops.errors.content_error_kinds`), never from a list kept here.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: a failure with a message for the user, a stable kind and an exit code."""

    kind = "error"
    exit_code = 2  # refused before running; `RunFailed` is 1
    retryable = False  # whether trying the same thing again may succeed (a store outage)


class ConfigError(PipelineError, ValueError):
    """Parameters or options that cannot be used (named in the message); also a ValueError."""

    kind = "bad_config"


class JobError(PipelineError):
    """A job refused by its pre-flight checks: tasks, checkpoint, input, output, cluster."""

    kind = "cannot_run"


class RunFailed(PipelineError):
    """A run that started and stopped short (finished objects are kept: a rerun resumes)."""

    kind = "run_failed"
    exit_code = 1


class Interrupted(RunFailed):
    """A run stopped by a signal (Ctrl-C, SIGTERM) where the signal came as an exception
    through code that would otherwise report it as something else (Ray's handler, in place
    while `ray.init` runs, exits with the signal's number). Exit code: 128 + the signal."""

    kind = "interrupted"

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self):  # (pickled by Prefect and Ray with its signal, not its message)
        return type(self), (self.signum,)


class OutputBusy(JobError):
    """Another run holds the output's lease."""

    kind = "output_busy"


class CredentialsError(ConfigError):
    """A credentials block that is missing or lacks a key and a secret."""

    kind = "bad_credentials"


class StackError(PipelineError):
    """The local stack could not be started or stopped, or its state is unusable."""

    kind = "stack_error"
