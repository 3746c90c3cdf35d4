"""A finished build told in a few lines: what the console prints."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipelines.storage import redact_uri


def _empty_build_warning(counts: dict[str, Any]) -> list[str]:
    """A line when every segment was dropped, naming the rule that dropped the most."""
    if counts["kept"] or not counts["input_segments"]:
        return []
    most = max(counts["dropped"].items(), key=lambda kv: kv[1], default=("?", 0))[0]
    return [f"warning: the build is empty: every segment was dropped, most by {most} "
            "(--filters sets the rules, e.g. '{\"drop_truncated\": false}'; a new build "
            "into this output needs --overwrite)"]


def format_training_data(manifest: dict[str, Any]) -> str:
    """Kept and dropped segments per split and rule, the shards and the manifest's URI."""
    counts = manifest["counts"]
    splits = ", ".join(f"{name} {s['rows']} ({s['source_files']} files, "
                       f"{s['duration_s'] / 3600:.4f} h)" for name, s in counts["splits"].items())
    dropped = ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items())
    return "\n".join([
        *_empty_build_warning(counts),
        f"kept {counts['kept']} of {counts['input_segments']} segments: {splits}; "
        f"dropped: {dropped or 'none'}",
        f"shards: {shard_counts(manifest)} under {manifest['destination'].rstrip('/')}/",
        f"manifest: {redact_uri(manifest['manifest_uri'])}"])


def shard_counts(manifest: dict[str, Any]) -> str:
    """What each format wrote, e.g. `2 Parquet + 2 WebDataset tars + 2 HF Parquet + lhotse (4
    manifests, 9 FLAC files)`."""
    shards = manifest["shards"]
    counts = Counter(s["format"] for s in shards)
    formats = manifest.get("formats", [])
    parts = [f"{counts['parquet']} Parquet"]
    if "webdataset" in formats:
        parts.append(f"{counts['webdataset']} WebDataset tars")
    if "hf" in formats:
        parts.append(f"{counts['hf']} HF Parquet")
    if "lhotse" in formats:
        files = sum(s["rows"] for s in shards if s["format"] == "lhotse-audio")
        parts.append(f"lhotse ({counts['lhotse']} manifests, {files} FLAC files)")
    return " + ".join(parts)
