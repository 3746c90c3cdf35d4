"""What `kimi-label run` and `transcribe-archive` show of a run's progress, drawn from the job's
own counts (`pipelines.job.progress`): files done of total, audio-hours, throughput, ETA.

  * stderr is a terminal: a rich progress bar, redrawn in place below the log lines (rich
    prints them above it); it stays on screen at the run's last state;
  * stderr is not a terminal (CI, a log file, `2> run.log`): one compact line when the run
    starts, then at most one every LINE_EVERY_S seconds, and one when it ends, e.g.
    `progress: run 2026...: 120/400 files, 1:31:12 audio, 3.10 files/s, 41x real time,
    ETA 0:01:30`.

Either way Ray Data's own per-operator progress (bars on a terminal, log lines off one) is
turned off for the run: ours replaces it. stdout keeps only the command's report.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import TextIO

from pipelines.job.progress import Progress, ProgressListener, describe, progress_parts

LINE_EVERY_S = 30.0


def progress_for(stream: TextIO | None = None) -> ProgressListener:
    """The listener that shows a run's progress on `stream` (stderr): a bar on a terminal, else
    compact lines (module docstring)."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return TerminalProgress(stream) if isatty and isatty() else LineProgress(stream)


class LineProgress(ProgressListener):
    """A line at the start, at most one every `every_s` seconds, and one at the end; none for a
    run with nothing to do."""

    replaces_ray_progress = True

    def __init__(self, stream: TextIO, every_s: float = LINE_EVERY_S, clock=time.monotonic):
        self.stream, self.every_s, self.clock = stream, every_s, clock
        self.last = 0.0

    def started(self, progress: Progress) -> None:
        self.last = self.clock()
        if progress.files_total:
            self._line(progress, f"{progress.files_total} files to label")

    def advanced(self, progress: Progress) -> None:
        if self.clock() - self.last >= self.every_s:
            self.last = self.clock()
            self._line(progress, describe(progress))

    def ended(self, progress: Progress) -> None:
        if progress.files_total:
            self._line(progress, f"{progress.state}: {describe(progress)}")

    def _line(self, progress: Progress, text: str) -> None:
        # written, not printed: a flow's `log_prints` would turn a print into a task's log line
        self.stream.write(f"progress: run {progress.run_id}: {text}\n")
        self.stream.flush()


class TerminalProgress(ProgressListener):
    """A rich progress bar on a terminal; nothing for a run with nothing to do. Its texts keep
    their width and the bar takes what is left (at 80 columns, about 10); a spinner shows the
    run is alive while no file lands."""

    replaces_ray_progress = True

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.bar = None
        self.task = None
        self.handlers = contextlib.ExitStack()

    def started(self, progress: Progress) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bar, SpinnerColumn, TextColumn
        from rich.table import Column

        if not progress.files_total:
            return

        def text(template: str) -> TextColumn:
            return TextColumn(template, table_column=Column(no_wrap=True))

        self.bar = Bar(SpinnerColumn(table_column=Column(no_wrap=True)),
                       text("[progress.percentage]{task.fields[files]}"), BarColumn(None),
                       text("[progress.percentage]{task.fields[audio]}"),
                       text("{task.fields[speed]}"), text("ETA {task.fields[eta]}"),
                       console=Console(file=self.stream), expand=True, redirect_stdout=True,
                       redirect_stderr=True)
        self.task = self.bar.add_task("", total=progress.files_total, **progress_parts(progress))
        self.bar.start()
        self.handlers.enter_context(log_handlers_writing_to(self.stream, self.bar.console))

    def advanced(self, progress: Progress) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=progress.files_done, **progress_parts(progress))

    def ended(self, progress: Progress) -> None:
        if self.bar is None:
            return
        self.advanced(progress)
        self.handlers.close()
        self.bar.stop()
        self.bar = None


@contextlib.contextmanager
def log_handlers_writing_to(stream: TextIO, console):
    """Log handlers that write to `stream` itself (Prefect's console handler holds the stream
    it was made with, and a rich Console of its own on it) print through `console` meanwhile,
    above its live bar; handlers that look up sys.stderr as they write (Ray's) are moved there
    by rich's own redirection."""
    from rich.file_proxy import FileProxy

    proxy = FileProxy(console, stream)
    moved = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                handler.setStream(proxy)
                inner = getattr(handler, "console", None)  # Prefect's: a rich Console
                if inner is not None and getattr(inner, "file", None) is stream:
                    inner.file = proxy
                moved.append((handler, inner))
    try:
        yield
    finally:
        for handler, inner in moved:
            handler.setStream(stream)
            if inner is not None and getattr(inner, "file", None) is proxy:
                inner.file = stream
