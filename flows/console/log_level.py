"""`kimi-label --log-level LEVEL`: the threshold of the log lines a command prints on stderr.

It sets, for the command's duration (an in-process caller of `flows.console.main` gets its own
logging back):
  * our loggers (`kimi_ops`, `pipelines`, `flows`): LEVEL;
  * Prefect's (`prefect`, flow and task run lines): LEVEL, also as PREFECT_LOGGING_LEVEL for
    when Prefect sets up its logging later in the command;
  * Ray's on this machine's driver (`ray`, Ray Data's console lines): LEVEL but not below INFO
    (`pipelines.job.ray_cluster.driver_log_level` reads it off the `pipelines` logger).
Files keep their own levels: Ray's session logs, Prefect's server. Without the option each
library keeps its default: Prefect's and Ray's INFO, ours WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OURS = ("kimi_ops", "pipelines", "flows")
PREFECT_ENV = "PREFECT_LOGGING_LEVEL"


def add_log_level(parser, top: bool) -> None:
    """`--log-level` on `parser`: the top-level parser's default is none (the libraries'), a
    command's leaves the top-level's value alone unless given after the command."""
    import argparse

    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, metavar="LEVEL",
                        default=None if top else argparse.SUPPRESS,
                        help="log lines at LEVEL and above: DEBUG, INFO, WARNING or ERROR "
                             "(ours, Prefect's, Ray's not below INFO); default: each library's")


@contextlib.contextmanager
def log_level(name: str | None) -> Iterator[None]:
    """The module docstring's levels while the block runs; nothing when `name` is None."""
    if name is None:
        yield
        return
    level = logging.getLevelName(name)
    loggers = [logging.getLogger(n) for n in (*OURS, "prefect")]
    saved = [(logger, logger.level) for logger in loggers]
    saved_env = os.environ.get(PREFECT_ENV)
    root = logging.getLogger()
    # before Prefect sets up logging (it puts its console handler on the root), our lines
    # need a handler of their own to be seen below WARNING
    handler = logging.StreamHandler(sys.stderr) if not root.handlers else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    os.environ[PREFECT_ENV] = name
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, before in saved:
            logger.setLevel(before)
        if handler is not None:
            root.removeHandler(handler)
        if saved_env is None:
            os.environ.pop(PREFECT_ENV, None)
        else:
            os.environ[PREFECT_ENV] = saved_env
