"""Writing a run's subtitles into its output: `write_run_subtitles(spec, run_id)`.

Each file gets `<output>/subtitles/<name>.srt` and `.vtt` (names: `pipelines.subtitles.naming`)
from its segment rows, ordered by `segment_index`; silent segments and empty transcripts give
no cue. What is written and removed is decided by `pipelines.subtitles.plan`. Writing a file's
subtitles again gives the same bytes, so a retried call is harmless.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipelines.spec import JobSpec
from pipelines.storage.access import open_input
from pipelines.storage.filesystem import resolve
from pipelines.storage.layout import OutputLayout
from pipelines.storage.manifest import read_manifest
from pipelines.storage.retry import RetryPolicy
from pipelines.subtitles.formats import FORMATS
from pipelines.subtitles.naming import Folder, below, claimed_names, input_prefix, run_names
from pipelines.subtitles.output import OutputState, read_state, segments_of
from pipelines.subtitles.plan import SubtitlePlan, plan_subtitles
from pipelines.subtitles.recorded import record_naming, recorded_namings


def write_file_subtitles(fs, root: str, name: str, segments: list[dict],
                         unless_same: bool = False) -> list[str]:
    """Write `<root>/subtitles/<name>.srt` and `.vtt` from one file's segment rows (any order;
    silent segments and empty transcripts give no cue). Returns the paths written: both, or
    none when `unless_same` and both files already hold these bytes."""
    ordered = sorted(segments, key=lambda s: s["segment_index"])
    cues = [(s["start_s"], s["end_s"], s.get("transcript") if s.get("status", "ok") == "ok"
             else None) for s in ordered]
    layout = OutputLayout(root)
    texts = {layout.subtitle(name, suffix): render(cues).encode("utf-8")
             for suffix, render in FORMATS.items()}
    if unless_same:
        try:
            if all(fs.cat_file(path) == body for path, body in texts.items()):
                return []
        except FileNotFoundError:
            pass
    fs.makedirs(posixpath.dirname(next(iter(texts))), exist_ok=True)
    for path, body in texts.items():
        fs.pipe_file(path, body)
    return list(texts)


def input_folder(spec: JobSpec) -> Folder:
    """The folder the names of `spec.input`'s objects are below (`naming.input_prefix`)."""
    single = not spec.is_manifest() and not open_input(spec.input, spec.storage_options).is_prefix
    return input_prefix(spec.input, spec.is_manifest(), single)


def input_scope(spec: JobSpec, folder: Folder) -> Callable[[str], bool]:
    """Whether an object is one of this input's: a manifest's entry, else below `folder`."""
    if spec.is_manifest():
        listed = {info.uri for info in read_manifest(spec.input, spec.storage_options,
                                                     spec.storage_retry)}
        return listed.__contains__
    return lambda uri: below(uri, folder) is not None


def run_summary(state: OutputState, output: str) -> dict[str, Any]:
    """The counts of the run's own rows, with every count of writing at zero."""
    rows = state.this_run
    failed = [r for r in rows if r["status"] != "ok"]
    return {
        "run_id": state.run_id,
        "recordings": len({r["source_uri"] for r in rows if r["status"] == "ok"}),
        "errors": len(failed),
        "errors_by_kind": dict(Counter((r["error"] or {}).get("kind") or "unknown"
                                       for r in failed)),
        "audio_hours": sum(r["duration_s"] or 0.0 for r in rows if r["status"] == "ok") / 3600.0,
        "segments": 0, "recordings_without_segments": 0, "subtitle_files": 0,
        "subtitle_files_removed": 0, "recovered": 0,
        "subtitles_dir": f"{OutputLayout(output).subtitles}/",
    }


def _remove(fs, layout: OutputLayout, names: set[str], state: OutputState) -> int:
    """Remove the subtitle files of `names` that the listing found; returns how many."""
    removed = 0
    for name in sorted(names):
        for suffix in FORMATS:
            path = layout.subtitle(name, suffix)
            if path in state.subtitle_times:
                fs.rm_file(path)
                removed += 1
    return removed


def _write(fs, layout: OutputLayout, plan: SubtitlePlan, state: OutputState,
           counts: dict[str, Any], retry: RetryPolicy | None) -> None:
    """Write the subtitles `plan` lists, counting them into `counts`."""
    wanted = {uri: (target.run_id, target.shard) for uri, target in plan.write.items()}
    for uri, segments in segments_of(fs, layout, wanted, retry):
        target = plan.write[uri]
        written = write_file_subtitles(fs, layout.root, target.name, segments,
                                       unless_same=target.unless_same)
        counts["subtitle_files"] += len(written)
        if target.run_id == state.run_id:
            counts["segments"] += len(segments)
            counts["recordings_without_segments"] += int(not segments)
        elif written:
            counts["recovered"] += 1


def write_run_subtitles(spec: JobSpec, run_id: str) -> dict[str, Any]:
    """Subtitles for every ok file of `run_id`, and for every earlier ok file of the input whose
    subtitles are missing or older than its row; stale subtitles of error files removed
    (`pipelines.subtitles.plan`). Records how the run named them (`recorded`).

    Lists `subtitles/` and `files/` once and reads `files/` (a few columns), then the segments
    of the files to write (`output.segments_of`). Returns counts and kinds: those of the run's
    rows (`run_summary`), plus `subtitle_files` written, `subtitle_files_removed`, `segments`,
    `recordings_without_segments` and `recovered` (earlier recordings whose subtitles were
    written again)."""
    fs, root = resolve(spec.output, spec.storage_options)
    layout, retry = OutputLayout(root), spec.storage_retry
    state = read_state(fs, layout, run_id, retry)
    counts = run_summary(state, spec.output)
    if not state.this_run and not state.earlier:
        return counts

    folder = input_folder(spec)
    namings = recorded_namings(fs, layout, sorted(state.earlier), retry)
    names, naming = run_names([r["source_uri"] for r in state.this_run], folder,
                              claimed_names(state.ok_uris_by_run(), namings))
    if state.this_run:
        record_naming(fs, layout, run_id, naming, retry)
    # the manifest is read only when there are earlier files to look for
    in_scope = input_scope(spec, folder) if state.earlier else (lambda uri: False)
    plan = plan_subtitles(state, layout, names, folder, namings, in_scope)

    counts["subtitle_files_removed"] = _remove(fs, layout, plan.remove, state)
    _write(fs, layout, plan, state, counts, retry)
    return counts
