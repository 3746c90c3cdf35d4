"""Running a flow here, from the console: Prefect's side of `kimi-label run` and friends.

`run_flow_here(flow, params)` checks the Prefect API this process is set to use (or starts a
temporary server of its own, which dies with this process), runs the flow, and returns its
result, or raises the failure as a `PipelineError` (its message is the failure's reason, its
exit code 1 for a run that failed, the error's own for a refusal). Prefect logs a failing
flow's exception with its stack: for the pipeline's own errors only the message is kept (the
command ends with the reason anyway); anything else, a bug, keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from pipelines.errors import PipelineError, RunFailed, StackError

SERVER_START_S = 120  # the longest a temporary Prefect server may take to answer, unless
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # says otherwise


def prefect_defaults() -> None:
    """Before Prefect is imported: the temporary Prefect server of a flow run from here sends no
    telemetry (offline machines logged an ERROR for it); an explicit setting wins."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def run_flow_here(flow, params, name: str) -> Any:
    """`flow(params)` run in this process; its result, or a PipelineError saying why not."""
    with tracebacks_only_for_bugs():
        start_temporary_server()
        state = flow(params, return_state=True)
    if not state.is_completed():
        raise failure(state, name)
    return state.result()


def check_prefect_api() -> None:
    """Raise a PipelineError (exit 2) when the Prefect API this process is set to use does
    not answer (`prefect_api_unreachable`)."""
    unreachable = prefect_api_unreachable()
    if unreachable:
        raise PipelineError(unreachable)


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
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)

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
    # Prefect's 20 s default is too short for a busy small machine (seen at 25-60 s on two
    # loaded cores); the user's own setting wins
    timeout = (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
               if STARTUP_SETTING in os.environ else SERVER_START_S)
    try:
        temporary.start(timeout=timeout)
    except RuntimeError as exc:  # Prefect's "Timed out while attempting to connect"
        raise StackError(f"the temporary Prefect server did not answer within {timeout} s "
                         f"({STARTUP_SETTING}): start a server (`kimi-label stack up "
                         "--prefect`) and set PREFECT_API_URL to it") from exc


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



def failure(state, name: str) -> PipelineError:
    """A failed flow run as the error the console reports: the pipeline's own error as it is,
    anything else as a run that failed, with its type and message (or Prefect's message)."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, BaseException):
        return RunFailed(f"{type(exc).__name__}: {exc}")
    return RunFailed(state.message or f"the {name} flow failed")


@contextlib.contextmanager
def tracebacks_only_for_bugs():
    """Prefect's log lines of a failing flow or task keep the message and drop the stack for
    the pipeline's own errors; anything else keeps its traceback."""
    import logging

    def strip(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
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
