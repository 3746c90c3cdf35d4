"""Ctrl-C and SIGTERM stop a command even when the exception a signal handler raises is lost.

Python runs a signal's handler in the main thread between two bytecodes. When that moment falls
in a finaliser or a weakref callback (in a CI run: the callback that drops an import's module
lock), the exception the handler raises cannot propagate: Python prints ``Exception ignored in``
and carries on, and the job ran to its end. The handler may be ours (KeyboardInterrupt),
Prefect's while a flow runs (``TerminationSignal``, it replaces SIGTERM's) or Ray's while
``ray.init`` runs (``SystemExit`` with the signal's number).

`interrupting_signals` installs ours and, through ``sys.unraisablehook``, sends the signal again
whenever such an exception was lost, a moment later from a helper thread (not from inside the
hook, where the new exception would be lost too): the handler then in place raises it where it
propagates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESEND_AFTER_S = 0.05


def lost_signal(exc: BaseException | None, received: list[int]) -> int | None:
    """The signal whose exception `exc` is, or None when it is not one of a signal's (`received`:
    the signals our handler saw, in order)."""
    if isinstance(exc, KeyboardInterrupt):
        return received[-1] if received else signal.SIGINT
    if isinstance(exc, SystemExit):
        return exc.code if exc.code in SIGNALS else None
    if exc is not None and not isinstance(exc, Exception):  # Prefect's TerminationSignal
        signum = getattr(exc, "signal", None)
        return signum if signum in SIGNALS else None
    return None


def _resend(signum: int) -> None:
    time.sleep(RESEND_AFTER_S)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def interrupting_signals() -> Iterator[list[int]]:
    """While open, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, and a signal's
    exception lost in a finaliser comes again. Yields the signals received, in order (libraries
    on the way may turn the KeyboardInterrupt into another exception: this list is the record).
    Outside the main thread, where signals cannot be handled, it changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def on_unraisable(unraisable) -> None:
        signum = lost_signal(unraisable.exc_value, received)
        if signum is None:
            previous_hook(unraisable)
        else:
            threading.Thread(target=_resend, args=(signum,), name="resend-signal",
                             daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    sys.unraisablehook = on_unraisable
    try:
        yield received
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
