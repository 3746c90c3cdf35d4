"""Where a checkpoint's parts live, and fetching a model id from the Hugging Face hub.

Official layout: `<model>/config.json`, `tiktoken.model`, weights (`model.safetensors` or shards +
index), `whisper-large-v3/`; the GLM-4-Voice tokenizer is a separate repository officially, here
by default `<model>/glm-4-voice-tokenizer`, overridable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kimi_ops.errors import CheckpointError

log = logging.getLogger(__name__)

GLM_SUBDIR = "glm-4-voice-tokenizer"
WHISPER_SUBDIR = "whisper-large-v3"
TEXT_ONLY_PATTERNS = ["*.json", "*.model", "*.safetensors", f"{WHISPER_SUBDIR}/*"]


@dataclass(frozen=True)
class CheckpointPaths:
    root: Path
    glm: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def tiktoken(self) -> Path:
        return self.root / "tiktoken.model"

    @property
    def whisper(self) -> Path:
        return self.root / WHISPER_SUBDIR

    def check(self) -> CheckpointPaths:
        for path in (self.config, self.tiktoken, self.whisper, self.glm):
            if not path.exists():
                raise CheckpointError(f"{path}: required part of the checkpoint is missing")
        return self


def _fetch(model_id: str, allow_patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{model_id}: not a local folder, and the Hugging Face hub cannot be reached to fetch "
            f"it ({exc.__class__.__name__}); download it elsewhere and pass its path") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{model_id}: cannot fetch from the Hugging Face hub: {exc}") from None


def _local_or_hub(name: str | Path, what: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is; a name shaped like `owner/name` (not absolute, not starting with
    '.' or '~') fetched from the hub; any other name is a missing folder."""
    if Path(name).is_dir():
        return Path(name)
    text = str(name)
    if Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: {what} folder not found")
    return _fetch(text, allow_patterns)


def resolve_checkpoint(model: str | Path, glm_tokenizer: str | Path | None = None) -> CheckpointPaths:
    """A local folder is used as is; anything else that looks like `owner/name` is a hub id."""
    root = _local_or_hub(model, "checkpoint", TEXT_ONLY_PATTERNS)
    glm = (root / GLM_SUBDIR if glm_tokenizer is None
           else _local_or_hub(glm_tokenizer, "GLM-4-Voice tokenizer"))
    return CheckpointPaths(root, glm).check()


def checkpoint_id(root: Path, cache_file: Path | None = None) -> str:
    """A content hash of the checkpoint: sha256 over every file's relative path and bytes.

    Hashing the 7B checkpoint (~25 GB with the Whisper and GLM folders) takes a minute, so each
    file's digest is cached by (path, size, mtime) in `~/.cache/kimi-label/file-digests.json`.
    """
    cache_file = cache_file or Path.home() / ".cache" / "kimi-label" / "file-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    changed = False
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            file_digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    file_digest.update(block)
            cache[key] = file_digest.hexdigest()
            changed = True
        digest.update(f"{path.relative_to(root).as_posix()}\0{cache[key]}\n".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        except OSError:
            log.warning("cannot write the checkpoint digest cache %s", cache_file)
    return f"kimi-{digest.hexdigest()[:16]}"


