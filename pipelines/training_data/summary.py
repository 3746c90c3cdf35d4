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
    formats = Counter(s["format"] for s in manifest["shards"])
    return "\n".join([
        *_empty_build_warning(counts),
        f"kept {counts['kept']} of {counts['input_segments']} segments: {splits}; "
        f"dropped: {dropped or 'none'}",
        f"shards: {formats['parquet']} Parquet"
        + (f" + {formats['webdataset']} WebDataset tars" if manifest["webdataset"] else "")
        + f" under {manifest['destination'].rstrip('/')}/",
        f"manifest: {redact_uri(manifest['manifest_uri'])}"])
