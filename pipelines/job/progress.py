"""A run's progress: files done of the plan's total, audio-hours, throughput and ETA, told to
listeners as the files land at the driver.

    with watching(listener):          # any ProgressListener: a terminal bar, a Prefect artifact
        run_job(spec)

The job (`pipelines.job.run`) counts each input file once, when its final summary row reaches
the driver: a whole file's row as it comes out of Ray Data, a long file's when the stitcher has
all its pieces (`pipelines.job.stitch`). The total is the plan's to-do count. Audio-hours are
those labelled (an error row adds none); the total audio is not known during a run (the plan
holds sizes, not durations; `--dry-run` reads the headers).

Throughput is measured from the first landing on (the first batch's files, all but together):
what came before it is Ray's start and the models' loading, which a rate over the whole run
would spread over the files. ETA is the
files left at that rate. Listeners are found through a context variable (`watching`), so the
console can watch a job that a Prefect flow runs in this process; a listener that raises is
dropped with a warning, never failing the run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

log = logging.getLogger(__name__)
LANDING_S = 0.5  # files landing within this of the first are the first landing (one batch)


@dataclass(frozen=True)
class Progress:
    """A run's progress as of one moment (all a listener needs to draw it)."""

    run_id: str
    files_total: int
    files_done: int = 0
    errors: int = 0  # files done as error rows
    audio_s: float = 0.0  # labelled audio of the files done
    elapsed_s: float = 0.0  # since the run's stages started
    files_per_s: float | None = None  # since the first file landed; None before a second one
    audio_per_s: float | None = None  # audio seconds per wall second (x real time), likewise
    state: Literal["running", "completed", "failed"] = "running"

    @property
    def fraction(self) -> float:
        """Files done of the total, 0..1 (1 for a run with nothing to do)."""
        return self.files_done / self.files_total if self.files_total else 1.0

    @property
    def audio_hours(self) -> float:
        return self.audio_s / 3600.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None while there is no rate yet."""
        if self.files_done >= self.files_total:
            return 0.0
        if not self.files_per_s:
            return None
        return (self.files_total - self.files_done) / self.files_per_s


def progress_parts(p: Progress) -> dict[str, str]:
    """The progress as short texts (files, audio, speed, eta), for bars, lines and artifacts."""
    files = f"{p.files_done}/{p.files_total} files"
    speed = (f"{p.files_per_s:.2f} files/s, {_times(p.audio_per_s)} real time"
             if p.files_per_s is not None and p.audio_per_s is not None else "measuring speed")
    return {"files": files + (f" ({p.errors} failed)" if p.errors else ""),
            "audio": f"{clock_time(p.audio_s)} audio", "speed": speed,
            "eta": "?" if p.eta_s is None else clock_time(p.eta_s)}


def describe(p: Progress) -> str:
    """One line: `12/40 files, 0:31:48 audio, 1.20 files/s, 45x real time, ETA 0:03:10` (the
    labelled audio's length, hours:minutes:seconds; how many times real time it goes)."""
    parts = progress_parts(p)
    return f"{parts['files']}, {parts['audio']}, {parts['speed']}, ETA {parts['eta']}"


def _times(factor: float) -> str:
    return f"{factor:.1f}x" if factor < 10 else f"{factor:.0f}x"


def clock_time(seconds: float) -> str:
    """`H:MM:SS`."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ProgressListener:
    """What a run tells of its progress: `started` once the plan is known, `advanced` after
    each file done, `ended` once (also when the run fails). Override what you need."""

    # a listener that draws on the terminal: Ray Data's own per-operator bars would fight it,
    # so the job turns them off while it listens (`pipelines.job.dataset.build_dataset`)
    replaces_ray_progress: ClassVar[bool] = False

    def started(self, progress: Progress) -> None:
        pass

    def advanced(self, progress: Progress) -> None:
        pass

    def ended(self, progress: Progress) -> None:
        pass


_LISTENERS: ContextVar[tuple[ProgressListener, ...]] = ContextVar("kimi_label_progress",
                                                                  default=())


@contextlib.contextmanager
def watching(*listeners: ProgressListener) -> Iterator[None]:
    """Runs started inside tell `listeners` (besides those already watching) their progress."""
    token = _LISTENERS.set(_LISTENERS.get() + listeners)
    try:
        yield
    finally:
        _LISTENERS.reset(token)


class ProgressTracker:
    """The counting: fed the files as they land, it tells the listeners (module docstring)."""

    def __init__(self, run_id: str, files_total: int,
                 listeners: tuple[ProgressListener, ...] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.listeners = list(_LISTENERS.get() if listeners is None else listeners)
        self.clock = clock
        self.progress = Progress(run_id, files_total)
        self._started = clock()
        self._first: tuple[float, int, float] | None = None  # (when, files, audio) at landing

    @property
    def replaces_ray_progress(self) -> bool:
        return any(listener.replaces_ray_progress for listener in self.listeners)

    def start(self) -> None:
        self._started = self.clock()
        self._tell("started")

    def file_done(self, row: dict) -> None:
        """A file's final summary row (`pipelines.stages.write.summary_row`)."""
        p = self.progress
        self.progress = replace(p, files_done=p.files_done + 1,
                                errors=p.errors + (row["status"] != "ok"),
                                audio_s=p.audio_s + (row["duration_s"] or 0.0))
        self._measure()
        self._tell("advanced")

    def end(self, ok: bool) -> None:
        self._measure()
        p = self.progress
        if p.files_per_s is None and p.files_done and p.elapsed_s > 0:  # one landing: overall
            p = replace(p, files_per_s=p.files_done / p.elapsed_s,
                        audio_per_s=p.audio_s / p.elapsed_s)
        self.progress = replace(p, state="completed" if ok else "failed")
        self._tell("ended")

    def _measure(self) -> None:
        now, p = self.clock(), self.progress
        if p.files_done and (self._first is None or now - self._first[0] < LANDING_S):
            # the first landing: the files of the first batch out, all but together
            self._first = (self._first[0] if self._first else now, p.files_done, p.audio_s)
        if self._first is None:
            self.progress = replace(p, elapsed_s=now - self._started)
            return
        when, files, audio = self._first
        span = now - when
        rates = ({"files_per_s": (p.files_done - files) / span,
                  "audio_per_s": (p.audio_s - audio) / span}
                 if span > 0 and p.files_done > files else {})
        self.progress = replace(p, elapsed_s=now - self._started, **rates)

    def _tell(self, event: str) -> None:
        for listener in list(self.listeners):
            try:
                getattr(listener, event)(self.progress)
            except Exception as exc:  # progress is for eyes: it never ends a run
                log.warning("progress: %s stopped listening after an error: %s: %s",
                            type(listener).__name__, type(exc).__name__, exc)
                self.listeners.remove(listener)
