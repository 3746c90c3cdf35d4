"""What a run writes and removes under `subtitles/`, decided from the output's state. No I/O.

  * Every ok file of this run gets its subtitles, under this run's names.
  * Every error file of this run loses the subtitles an earlier run wrote for it (its content
    changed and they no longer hold it).
  * An earlier run's file of this input that this run did not label is looked for under the
    name its run gave it. An ok one whose subtitles are missing or older than its `files/`
    shard gets them (again): its run stopped between labelling and subtitles, so they were
    never written, or are still those of the object's previous content. Those merely older are
    compared before they are written (maybe only the shard was rewritten, dropping another
    object's row). An error one whose subtitles are older than its shard loses them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pipelines.storage.layout import OutputLayout
from pipelines.subtitles.formats import FORMATS
from pipelines.subtitles.naming import Folder, Naming
from pipelines.subtitles.output import EarlierFile, OutputState


@dataclass(frozen=True)
class ToWrite:
    """The subtitles of one file, to be written."""

    run_id: str  # the run whose rows they are made from
    name: str
    shard: str  # the `files/` shard holding the file's row
    unless_same: bool = False  # in place already: written only when they differ


@dataclass
class SubtitlePlan:
    write: dict[str, ToWrite] = field(default_factory=dict)  # by source URI
    remove: set[str] = field(default_factory=set)  # names whose subtitles go


def _missing_or_stale(layout: OutputLayout, name: str, shard: str,
                      state: OutputState) -> tuple[bool, bool]:
    """Whether a file's subtitles are missing (either format), and whether one is older than
    its row's shard."""
    paths = [layout.subtitle(name, suffix) for suffix in FORMATS]
    times, shard_time = state.subtitle_times, state.shard_times[shard]
    missing = any(path not in times for path in paths)
    stale = shard_time is not None and any(
        times.get(path) is not None and times[path] < shard_time for path in paths)
    return missing, stale


def _plan_this_run(state: OutputState, names: Mapping[str, str], plan: SubtitlePlan) -> None:
    for row in state.this_run:
        name = names[row["source_uri"]]
        if row["status"] == "ok":
            plan.write[row["source_uri"]] = ToWrite(state.run_id, name, row["shard"])
        else:
            plan.remove.add(name)


def _plan_earlier_run(run_id: str, files: list[EarlierFile], naming: Naming,
                      layout: OutputLayout, state: OutputState, plan: SubtitlePlan) -> None:
    names = naming.names_of(f.uri for f in files)
    for file in files:
        missing, stale = _missing_or_stale(layout, names[file.uri], file.shard, state)
        if file.ok and (missing or stale):
            plan.write[file.uri] = ToWrite(run_id, names[file.uri], file.shard,
                                           unless_same=not missing)
        elif not file.ok and stale:
            plan.remove.add(names[file.uri])


def plan_subtitles(state: OutputState, layout: OutputLayout, names: Mapping[str, str],
                   folder: Folder, namings: Mapping[str, Naming],
                   in_scope: Callable[[str], bool]) -> SubtitlePlan:
    """The plan of run `state.run_id` (module docstring). `names`: this run's names of its
    files; `folder`: the one they are below; `namings`: the earlier runs' recorded namings (a
    run without one named as this run does); `in_scope`: whether an earlier run's object is
    one of this input's (only those are looked for: an output once written from another input
    would otherwise get copies under other names)."""
    plan = SubtitlePlan()
    _plan_this_run(state, names, plan)
    for run_id, files in sorted(state.earlier.items()):
        files = [f for f in files if f.uri not in names and in_scope(f.uri)]
        if files:
            # as that run named them: an earlier run on a parent or sibling folder of this
            # input named them relative to its own input
            naming = namings.get(run_id, Naming(folder))
            _plan_earlier_run(run_id, files, naming, layout, state, plan)
    return plan
