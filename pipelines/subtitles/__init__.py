"""Subtitles (SRT and WebVTT) of transcribed recordings, written next to the labelled tables.

    counts = write_run_subtitles(spec, run_id)   # after run `run_id` of the job `spec` labelled

One module a job each:
  formats   cue layout and timing, SRT and WebVTT text: pure functions
  naming    which name an object's subtitles get: pure functions
  recorded  a run's naming, recorded in `_runs/<run id>/subtitles.json` and read back
  output    what subtitles are made from: listings with times, file rows, segment rows
  plan      what a run writes and removes, decided from the output's state
  writing   `write_run_subtitles`: all of the above, on the output's filesystem

Subtitles: for every file row of the run with status ok, its segments (ordered by
`segment_index`) become `<output>/subtitles/<relative path>.srt` and `.vtt`, where the relative
path is the object's path below the input prefix (below the manifest's folder for a manifest,
below the file's folder for a single-object input), extension kept (`a/b.wav` ->
`subtitles/a/b.wav.srt`). An object outside that prefix (a manifest entry elsewhere) uses its
basename; when two objects of one run would share a name, each of them gets a short hash of its
URI (`b.wav.1a2b3c4d.srt`). Objects whose row of the run is an error lose subtitles an earlier
run wrote for them (their content changed and is no longer usable).

Resuming: subtitles are recomputed for every file row carrying the run id, whichever attempt of
the run wrote it (a caller that reuses a run id on retries, as transcribe-archive does, covers
them all). Writing them again gives the same bytes. A run stopped between labelling and
subtitles leaves ok rows of an earlier run id without subtitles (or with those of the object's
previous content): every run also writes the subtitles of the input's earlier ok rows whose
files are missing or older than their `files/` shard, found from one listing of `subtitles/` and
of `files/`, so a run with nothing new to label and nothing missing writes nothing.

Recovery under earlier names: each run records the folder its names are below and the objects
it named otherwise (`_runs/<run id>/subtitles.json`); earlier recordings are looked for, and
written back, under the names their run gave them (a run on a subfolder of an earlier run's
input would otherwise write copies under names relative to the subfolder). A name that an
earlier run's recording holds (runs on sibling folders, a day's folder each, whose recorders
repeat file names) is not taken over: the new recording gets its URI's hash, as two objects of
one run do. The counts returned cover the run's `files/` rows (all its attempts) and say how
many earlier recordings got their subtitles back (`recovered`).
"""

from pipelines.subtitles.formats import FORMATS, Cue, split_cue, to_srt, to_webvtt
from pipelines.subtitles.naming import (Naming, input_prefix, relative_path, safe_relative,
                                        subtitle_names, with_hash)
from pipelines.subtitles.writing import write_file_subtitles, write_run_subtitles

__all__ = [
    "FORMATS", "Cue", "Naming", "input_prefix", "relative_path", "safe_relative", "split_cue",
    "subtitle_names", "to_srt", "to_webvtt", "with_hash", "write_file_subtitles",
    "write_run_subtitles",
]
