"""Front-end stage (an actor, on a GPU when there is one): GLM-4-Voice VQ tokens and
Whisper-large-v3 features for every segment of a batch, in one front-end call.

Features travel to the label stage as raw bytes in the encoder's own dtype (from a bf16 GPU
encoder half the bytes of fp32 through the object store; the label model casts them to bf16
anyway): `features_to_bytes` and its inverse `features_from_bytes`.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipelines.spec import STAGE_DEFAULTS, StageResources
from pipelines.stages.base import (Stage, keep_large_buffers_off_the_heap, release_free_memory,
                                   set_threads)


def features_to_bytes(features) -> tuple[bytes, str]:
    """A CPU feature tensor's raw bytes in its own dtype, and that dtype's name."""
    import torch

    name = str(features.dtype).removeprefix("torch.")
    data = features.cpu().contiguous()
    if features.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 16 bits as int16
        data = data.view(torch.int16)
    return data.numpy().tobytes(), name


def features_from_bytes(data: bytes, dtype: str, rows: int):
    """`features_to_bytes`' inverse: a [rows, dim] tensor of `dtype`."""
    import torch

    array = np.frombuffer(data, dtype=np.int16 if dtype == "bfloat16" else np.dtype(dtype))
    tensor = torch.from_numpy(array.reshape(rows, len(array) // max(rows, 1)).copy())
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


class FrontendStage(Stage):
    """Actor: GLM-4 VQ tokens and Whisper features for every segment of every file in a batch,
    in one front-end call. The waveform column is dropped here."""

    name = "frontend"
    actor = True

    def __init__(self, model: str, glm_tokenizer: str | None, device: str | None,
                 resources: StageResources | None = None):
        self.model, self.glm_tokenizer, self.device = model, glm_tokenizer, device
        self.resources = resources or STAGE_DEFAULTS["frontend"]
        self.frontend = None

    def setup(self) -> None:
        import torch

        from kimi_ops.engine.api import default_device, default_dtype
        from kimi_ops.frontend import AudioFrontend
        from kimi_ops.model.checkpoint import resolve_checkpoint

        if self.frontend is not None:
            return
        set_threads(self.resources.threads)
        keep_large_buffers_off_the_heap()
        paths = resolve_checkpoint(self.model, self.glm_tokenizer)
        dev = torch.device(self.device) if self.device else default_device()
        self.frontend = AudioFrontend.from_checkpoint(paths.root, glm_dir=paths.glm, device=dev,
                                                      dtype=default_dtype(dev))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kimi_ops.engine.api import halve_on_oom

        start = time.perf_counter()
        rows = batch.to_pylist()
        clips, owners = [], []
        for r, row in enumerate(rows):
            if row["error_kind"] is not None:
                continue
            wave, offset = np.frombuffer(row["audio"], dtype=np.float32), row["offset"]
            for seg in row["segments"]:
                clips.append(wave[seg["start"] - offset: seg["end"] - offset])
                owners.append(r)
        # features in the encoder's own dtype: from a bf16 GPU encoder half the bytes of fp32
        # through the object store, and the label model casts them to bf16 anyway
        encodings = halve_on_oom(lambda c: self.frontend.encode(c, features_dtype=None), clips,
                                 "audio front-end") if clips else []
        tokens: list[list] = [[] for _ in rows]
        features: list[list] = [[] for _ in rows]
        dtypes: list[str | None] = [None] * len(rows)
        for r, enc in zip(owners, encodings):
            tokens[r].append(enc.tokens.astype(np.int32).tolist())
            data, dtypes[r] = features_to_bytes(enc.features)
            features[r].append(data)
        elapsed = time.perf_counter() - start
        out = batch.drop_columns(["audio"])
        out = out.append_column("tokens", pa.array(tokens, pa.list_(pa.list_(pa.int32()))))
        out = out.append_column("features", pa.array(features, pa.list_(pa.large_binary())))
        out = out.append_column("features_dtype", pa.array(dtypes, pa.string()))
        release_free_memory()
        return out.append_column("frontend_s", pa.array([elapsed / max(len(rows), 1)] * len(rows),
                                                        pa.float64()))
