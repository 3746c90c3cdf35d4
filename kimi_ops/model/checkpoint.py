"""Where a checkpoint's parts live, and fetching a model id from the Hugging Face hub.

Official layout: `<model>/config.json`, `tiktoken.model`, weights (`model.safetensors` or shards +
index), `whisper-large-v3/`; the GLM-4-Voice tokenizer is a separate repository officially, here
by default `<model>/glm-4-voice-tokenizer`, overridable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kimi_ops.errors import CheckpointError

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


def resolve_checkpoint(model: str | Path, glm_tokenizer: str | Path | None = None) -> CheckpointPaths:
    """A local folder is used as is; anything else that looks like `owner/name` is a hub id."""
    root = Path(model)
    if not root.is_dir():
        if Path(model).is_absolute() or str(model).startswith(".") or str(model).count("/") != 1:
            raise CheckpointError(f"{model}: checkpoint folder not found")
        root = _fetch(str(model), TEXT_ONLY_PATTERNS)
    if glm_tokenizer is None:
        glm = root / GLM_SUBDIR
    elif Path(glm_tokenizer).is_dir():
        glm = Path(glm_tokenizer)
    else:
        glm = _fetch(str(glm_tokenizer))
    return CheckpointPaths(root, glm).check()
