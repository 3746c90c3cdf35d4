"""A signal stops the command even when its handler's exception is lost in a finaliser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.interrupts import lost_signal

ROOT = Path(__file__).resolve().parents[2]

# The signal comes while a finaliser runs, so the handler's exception is raised inside it and
# lost ("Exception ignored in"), as a CI run lost a SIGTERM in an import lock's weakref
# callback; then the program goes on for 5 s unless the signal comes again.
PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    from contextlib import nullcontext
    from pipelines.interrupts import interrupting_signals

    class SignalledInItsFinaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.{signum})
            time.sleep(0.2)  # the handler runs here, inside the finaliser

    backstop = interrupting_signals() if {backstop} else nullcontext([])
    if {prefect}:  # Prefect's SIGTERM bridge, in place while a flow runs
        from prefect.utilities.engine import capture_sigterm
    else:
        capture_sigterm = nullcontext
    with backstop as received:
        try:
            with capture_sigterm():
                SignalledInItsFinaliser()  # dropped at once: its __del__ runs
                for _ in range(100):
                    time.sleep(0.05)
            print("ran to its end")
        except BaseException as exc:
            print("stopped by", type(exc).__name__, received)
""")


def run_program(signum: str, prefect: bool, backstop: bool) -> subprocess.CompletedProcess:
    code = PROGRAM.format(signum=signum, prefect=prefect, backstop=backstop)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)


@pytest.mark.parametrize("signum, prefect", [("SIGINT", False), ("SIGTERM", False),
                                             ("SIGTERM", True)])
def test_a_signal_lost_in_a_finaliser_comes_again_and_stops_the_program(signum, prefect):
    done = run_program(signum, prefect, backstop=True)
    number = int(getattr(signal, signum))
    # our handler's record: the signal, once more for each time it came again
    stopped, received = done.stdout.strip().split(" [")
    assert stopped == "stopped by KeyboardInterrupt", (done.stdout, done.stderr)
    assert {int(n) for n in received.rstrip("]").split(", ")} == {number}, done.stdout
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_without_the_backstop_the_signal_is_lost():
    """What the backstop is for: Python drops the exception and the program runs on."""
    done = run_program("SIGTERM", prefect=True, backstop=False)
    assert done.stdout.strip() == "ran to its end", (done.stdout, done.stderr)
    assert "Exception ignored in" in done.stderr and "TerminationSignal" in done.stderr


def test_which_exceptions_are_a_signals():
    class TerminationSignal(BaseException):  # Prefect's shape: a BaseException with .signal
        def __init__(self, signum):
            self.signal = signum

    assert lost_signal(KeyboardInterrupt(), []) == signal.SIGINT
    assert lost_signal(KeyboardInterrupt(), [signal.SIGTERM]) == signal.SIGTERM
    assert lost_signal(SystemExit(signal.SIGTERM), []) == signal.SIGTERM  # Ray's handler
    assert lost_signal(TerminationSignal(signal.SIGTERM), []) == signal.SIGTERM
    for other in (SystemExit(0), SystemExit(1), ValueError("x"), None,
                  TerminationSignal(signal.SIGHUP)):
        assert lost_signal(other, []) is None
