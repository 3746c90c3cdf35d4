"""A run's progress (`pipelines.job.progress`): counting, rates, ETA and the listeners, fed
events by hand with a clock of our own."""

from __future__ import annotations

import logging

import pytest

from pipelines.job.progress import ProgressListener, ProgressTracker, describe, watching


class Recorder(ProgressListener):
    def __init__(self):
        self.events = []

    def started(self, progress):
        self.events.append(("started", progress))

    def advanced(self, progress):
        self.events.append(("advanced", progress))

    def ended(self, progress):
        self.events.append(("ended", progress))


def row(status="ok", duration_s=60.0):
    return {"source_uri": "x", "status": status, "duration_s": duration_s}


def test_progress_counts_files_audio_rates_and_eta_from_the_first_landing():
    now = [100.0]
    seen = Recorder()
    tracker = ProgressTracker("r1", 10, (seen,), clock=lambda: now[0])
    tracker.start()
    now[0] = 130.0  # Ray's start and the models' loading: not part of the rate
    tracker.file_done(row())
    tracker.file_done(row())
    first = tracker.progress
    assert (first.files_done, first.elapsed_s, first.files_per_s, first.eta_s) == (2, 30.0, None,
                                                                                   None)
    now[0] = 140.0  # 4 more files in 10 s: 0.4 files/s, 240 s of audio in 10 s
    for _ in range(3):
        tracker.file_done(row())
    tracker.file_done(row("error", 0.0))
    p = tracker.progress
    assert (p.files_done, p.errors, p.audio_s, p.elapsed_s) == (6, 1, 300.0, 40.0)
    assert p.files_per_s == pytest.approx(0.4) and p.audio_per_s == pytest.approx(18.0)
    assert p.eta_s == pytest.approx(10.0) and p.fraction == pytest.approx(0.6)
    assert p.audio_hours == pytest.approx(300 / 3600)
    assert describe(p) == ("6/10 files (1 failed), 0:05:00 audio, 0.40 files/s, "
                           "18x real time, ETA 0:00:10")
    tracker.end(ok=True)
    kinds = [kind for kind, _ in seen.events]
    assert kinds == ["started", *["advanced"] * 6, "ended"]
    assert seen.events[-1][1].state == "completed"
    assert [e[1].files_done for e in seen.events[1:-1]] == [1, 2, 3, 4, 5, 6]


def test_nothing_to_do_is_done_and_a_failing_listener_is_dropped(caplog):
    class Broken(ProgressListener):
        def advanced(self, progress):
            raise ConnectionError("the API went away")

    seen = Recorder()
    with watching(Broken()), watching(seen):  # found through the context, nested
        tracker = ProgressTracker("r2", 2)
    assert [type(listener) for listener in tracker.listeners] == [Broken, Recorder]
    assert ProgressTracker("r3", 0).listeners == []  # outside: nobody listens
    tracker.start()
    with caplog.at_level(logging.WARNING, logger="pipelines.job.progress"):
        tracker.file_done(row())
        tracker.file_done(row())
    assert "Broken stopped listening after an error: ConnectionError" in caplog.text
    assert caplog.text.count("stopped listening") == 1
    tracker.end(ok=False)
    assert seen.events[-1][1].state == "failed" and seen.events[-1][1].files_done == 2
    assert seen.events[-1][1].eta_s == 0.0
    empty = ProgressTracker("r4", 0, ())
    assert empty.progress.fraction == 1.0 and empty.progress.eta_s == 0.0
