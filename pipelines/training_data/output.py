"""A build's output folder: the only code that spells its layout, and what a build clears.

    train/part-00000.parquet ...        validation/part-00000.parquet ...   (always)
    webdataset/train-000000.tar ...     webdataset/validation-000000.tar ...  (webdataset)
    hf/train/part-00000.parquet ...     hf/validation/part-00000.parquet ...  (hf)
    lhotse/recordings_train.jsonl.gz    lhotse/supervisions_train.jsonl.gz    (lhotse; and
    lhotse/audio/train-000000/<key>.flac ...                                   _validation)
    manifest.json                       written last: its presence marks a complete build
    _staging/                           objects being written (`pipelines.storage.write_atomic`)

Shard number n of a split holds the same rows in every format (the lhotse audio of Parquet
shard n is under `lhotse/audio/<split>-<n>/`). The lhotse manifests' names are the ones lhotse's
`read_manifests_if_cached(["train", "validation"], output_dir=<output>/lhotse)` looks for.

A build into an output without a manifest (an interrupted earlier attempt) first removes that
attempt's shards; an output with a manifest needs `overwrite`. Anything else in train/,
validation/, webdataset/, hf/ or lhotse/ is not ours and stops the build.
"""

from __future__ import annotations

import re

from pipelines.storage import OutputLayout, redact_uri
from pipelines.training_data.errors import TrainingDataError

MANIFEST = "manifest.json"
SHARD_DIRS = ("train", "validation", "webdataset", "hf", "lhotse")
TOKENS_MEMBER = "tokens.npy"  # a WebDataset sample's tokens: `<key>.tokens.npy`
_SPLIT = "(train|validation)"
_SHARD_NAME = re.compile(rf"^(hf/)?{_SPLIT}/part-\d{{5}}\.parquet$"
                         rf"|^webdataset/{_SPLIT}-\d{{6}}\.tar$"
                         rf"|^lhotse/(recordings|supervisions)_{_SPLIT}\.jsonl\.gz$"
                         rf"|^lhotse/audio/{_SPLIT}-\d{{6}}/[0-9a-f]{{24}}-\d{{6}}\.flac$")


def parquet_shard(split: str, number: int) -> str:
    """A Parquet shard's path below the output."""
    return f"{split}/part-{number:05d}.parquet"


def webdataset_shard(split: str, number: int) -> str:
    """The WebDataset tar holding the rows of Parquet shard `number` of `split`."""
    return f"webdataset/{split}-{number:06d}.tar"


def hf_shard(split: str, number: int) -> str:
    """The HF dataset's Parquet shard holding the rows of Parquet shard `number` of `split`."""
    return f"hf/{parquet_shard(split, number)}"


def lhotse_manifest(kind: str, split: str) -> str:
    """A split's lhotse manifest; `kind`: recordings or supervisions."""
    return f"lhotse/{kind}_{split}.jsonl.gz"


def lhotse_audio_dir(split: str, number: int) -> str:
    """The folder of the segments' FLAC files of Parquet shard `number` of `split`."""
    return f"lhotse/audio/{split}-{number:06d}"


def manifest_uri(output: str) -> str:
    return f"{output.rstrip('/')}/{MANIFEST}"


def already_built(output: str) -> TrainingDataError:
    return TrainingDataError(f"{redact_uri(output)} already holds a build ({MANIFEST}); pass "
                             "--overwrite (overwrite=True) to replace it")


def holds_build(fs, root: str) -> bool:
    """Whether the output at `root` holds a complete build (its manifest)."""
    return fs.exists(f"{root}/{MANIFEST}")


def _shards_found(fs, root: str) -> tuple[list[str], list[str]]:
    """(our shards, other files) under the output's shard folders."""
    ours, foreign = [], []
    for name in SHARD_DIRS:
        if fs.exists(f"{root}/{name}"):
            for path in fs.find(f"{root}/{name}"):
                (ours if _SHARD_NAME.match(path[len(root) + 1:]) else foreign).append(path)
    return ours, foreign


def remove_staging(fs, root: str) -> None:
    """Whatever a write left staged (nothing, after a build that finished its writes)."""
    try:
        fs.rm(OutputLayout(root).staging, recursive=True)
    except (FileNotFoundError, OSError):
        pass


def prepare_output(fs, root: str, output: str, overwrite: bool) -> None:
    """Clear what an earlier build (with `overwrite`) or an interrupted one (no manifest) left
    at `root` (the output `output`). Raises TrainingDataError for a build without `overwrite`,
    and for files that are not our shards."""
    if holds_build(fs, root) and not overwrite:
        raise already_built(output)
    ours, foreign = _shards_found(fs, root)
    if foreign:
        raise TrainingDataError(f"{redact_uri(output)} holds files that are not training "
                                f"shards, e.g. {foreign[0][len(root) + 1:]}; choose an empty "
                                "output")
    if holds_build(fs, root):
        fs.rm(f"{root}/{MANIFEST}")  # first: shards without a manifest are an unfinished build
    if ours:
        fs.rm(ours)  # one call: a store deletes them in batches
    remove_staging(fs, root)
    fs.makedirs(root, exist_ok=True)
