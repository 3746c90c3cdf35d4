"""Loading the language model's tensors from an official-layout checkpoint.

The only place that knows the checkpoint's tensor names. Accepts a single `model.safetensors` or
shards listed in `model.safetensors.index.json` (the official release has 36, bf16 on disk).
Rotary `inv_freq` buffers stored in the file are ignored (recomputed from `rope_theta`).
A missing, unexpected or misshapen tensor raises `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from kimi_ops.errors import CheckpointError
from kimi_ops.model.modeling import KimiAudioForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def shard_map(model_dir: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard "
                                  f"file names, got {type(weight_map).__name__}")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard "
                                  f"file names; {bad!r} maps to {weight_map[bad]!r}")
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _reading(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}


@contextmanager
def _reading(path: Path):
    """A file safetensors cannot read (truncated, corrupt header, not safetensors at all) is a
    CheckpointError naming it, not the library's bare message."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, EOFError) as exc:  # not out-of-memory
        raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from exc


def load_state_dict(model: KimiAudioForCausalLM, model_dir: str | Path, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> None:
    """Fill `model`'s parameters from the checkpoint in place, casting to `dtype`, then fuse its
    projections (`KimiAudioForCausalLM.fuse_projections`)."""
    model_dir = Path(model_dir)
    expected = dict(model.state_dict())
    locations = {n: p for n, p in shard_map(model_dir).items() if not n.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(locations))
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensors {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    unexpected = sorted(set(locations) - set(expected))
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected tensors {unexpected[:8]}")

    by_shard: dict[Path, list[str]] = {}
    for name, shard in locations.items():
        by_shard.setdefault(shard, []).append(name)
    loaded = {}
    for shard, names in by_shard.items():
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in the index is missing")
        with _reading(shard), safe_open(shard, framework="pt", device=str(device)) as f:
            for name in names:
                tensor = f.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(
                        f"{shard.name}: tensor {name} has shape {tuple(tensor.shape)}, "
                        f"expected {want} from config.json")
                loaded[name] = tensor.to(dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    model.fuse_projections()
