"""The decode step of the generation loop, in two forms with the same results.

`DynamicDecoder` (the CPU default) grows the KV cache as it goes, drops a finished row at once
and lets attention skip each row block's left padding: the least work per step.

`StaticDecoder` (the CUDA default) keeps every tensor shape fixed so that one step can be
captured as a CUDA graph and replayed: a 7B decode step is several hundred small kernels whose
launch cost otherwise rivals the step's memory-bound work. Rows live in slots; a finished
row's slot idles (fed blanks, output ignored) until a newcomer takes it (continuous batching:
its keys are written into the slot's columns ending at the cursor, so shapes and graph stay)
or, when no prompt is queued, until at most half the slots are live: then the live rows move
to a smaller batch and a new graph. The cache grows by `chunk` columns when full (a new graph
too). Without CUDA the same fixed-shape step runs eagerly, which is how the tests check it
against the dynamic one.

Both take newcomers with `add` (rows prefilled elsewhere) and expose `width`, the key columns
a row spans now, for the caller's memory bound.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from kimi_ops.model.modeling import ForwardOutput, KimiAudioForCausalLM, KVCache, key_spans

log = logging.getLogger(__name__)
CUDA_GRAPHS_ENV = "KIMI_CUDA_GRAPHS"  # "0": decode on CUDA without graphs (the dynamic decoder)


def use_static_decoder(device: torch.device) -> bool:
    """The default: the fixed-shape decoder with CUDA graphs on CUDA, unless turned off."""
    return device.type == "cuda" and os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"


class DynamicDecoder:
    refilling = False  # (the static decoder's compaction switch: this one drops rows at once)

    def __init__(self, model: KimiAudioForCausalLM, cache: KVCache, valid: torch.Tensor,
                 positions: torch.Tensor, first_key: list[int], with_mimo: bool):
        self.model, self.cache, self.valid = model, cache, valid
        self.positions, self.first_key, self.with_mimo = positions, first_key, with_mimo

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def keep(self, index: Sequence[int]) -> None:
        """Keep only these live rows (positions in the current live order)."""
        rows = torch.tensor(list(index), device=self.valid.device)
        self.cache.select_rows(rows)
        self.valid = self.valid.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)
        self.first_key = [self.first_key[j] for j in index]

    def add(self, cache: KVCache, valid: torch.Tensor, positions: torch.Tensor,
            first_key: list[int]) -> None:
        """Join rows prefilled elsewhere (their cache, key mask, last positions and first key
        columns): both sides are left-padded to the wider one and stacked, new rows last."""
        width = max(self.valid.shape[1], valid.shape[1])
        old, new = self.valid.shape[0], valid.shape[0]
        merged = self.model.new_cache(old + new, width + 16, self.with_mimo)
        mask = self.valid.new_zeros(old + new, width)
        for rows, part, part_valid in ((range(old), self.cache, self.valid),
                                       (range(old, old + new), cache, valid)):
            part.length = part_valid.shape[1]
            merged.put_rows(torch.tensor(list(rows), device=mask.device), part, width)
            mask[rows.start:rows.stop, width - part.length:] = part_valid
        merged.length = width
        self.first_key = ([k + width - self.valid.shape[1] for k in self.first_key]
                          + [k + width - valid.shape[1] for k in first_key])
        self.cache, self.valid = merged, mask
        self.positions = torch.cat([self.positions, positions])

    def step(self, audio_ids: Sequence[int], text_ids: Sequence[int]) -> ForwardOutput:
        device = self.valid.device
        self.positions = self.positions + 1
        self.valid = torch.cat([self.valid, self.valid.new_ones(len(audio_ids), 1)], dim=1)
        self.cache.reserve(1)
        return self.model(torch.tensor(audio_ids, device=device)[:, None],
                          torch.tensor(text_ids, device=device)[:, None],
                          self.positions, self.valid, self.cache, with_mimo=self.with_mimo,
                          last_only=True, spans=key_spans(self.first_key, self.valid.shape[1]))


class StaticDecoder:
    CHUNK = 256  # cache columns added when full
    # set while prompts are queued to join: a freed slot then waits for a newcomer (`add`)
    # instead of the live rows being compacted into a smaller batch
    refilling = False

    def __init__(self, model: KimiAudioForCausalLM, cache: KVCache, valid: torch.Tensor,
                 positions: torch.Tensor, with_mimo: bool, blank: int, budget: int,
                 cuda_graph: bool):
        self.model, self.with_mimo, self.blank, self.chunk = model, with_mimo, blank, self.CHUNK
        self.cuda_graph = cuda_graph
        self.device = valid.device
        self.length = valid.shape[1]  # next column to write
        batch = valid.shape[0]
        self.slots = list(range(batch))  # the slot of each live row, in live order
        self._allocate(batch, self.length + min(budget, self.chunk))
        self._copy_in(cache.keys, cache.values, valid, positions, torch.arange(batch))

    # -- state ---------------------------------------------------------------------------

    def _allocate(self, batch: int, capacity: int) -> None:
        self.cache = self.model.new_cache(batch, capacity, self.with_mimo)
        self.cache.write_at = torch.zeros(1, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.audio = torch.full((batch, 1), self.blank, dtype=torch.long, device=self.device)
        self.text = torch.full((batch, 1), self.blank, dtype=torch.long, device=self.device)
        self.graph, self.out = None, None

    @property
    def width(self) -> int:
        return self.length

    def _copy_in(self, keys, values, valid, positions, rows: torch.Tensor, shift: int = 0) -> None:
        """Rows `rows` of the given state, first `self.length` columns, into our slots 0..n-1,
        `shift` columns further right (the cursor then moves by as much)."""
        rows = rows.to(self.device)
        n, k, end = self.length, len(rows), self.length + shift
        for mine, theirs in ((self.cache.keys, keys), (self.cache.values, values)):
            for layer, tensor in enumerate(theirs):
                mine[layer][:k, :, shift:end] = tensor.index_select(0, rows)[:, :, :n]
        self.valid[:k, shift:end] = valid.index_select(0, rows)[:, :n]
        self.positions[:k] = positions.index_select(0, rows)
        self.length = end

    def _rebuild(self, rows: list[int], capacity: int, batch: int | None = None,
                 shift: int = 0) -> None:
        """The rows `rows` move to slots 0..n-1 of a new state of `batch` slots (default n);
        the caller renumbers `slots`."""
        old = (self.cache.keys, self.cache.values, self.valid, self.positions)
        self._allocate(batch or len(rows), capacity)
        self._copy_in(*old, torch.tensor(rows), shift)

    def keep(self, index: Sequence[int]) -> None:
        self.slots = [self.slots[j] for j in index]
        batch = self.valid.shape[0]
        if not self.refilling and 2 * len(self.slots) <= batch:  # a smaller batch, new graph
            self._rebuild(self.slots, self.valid.shape[1])
            self.slots = list(range(len(self.slots)))

    def add(self, cache: KVCache, valid: torch.Tensor, positions: torch.Tensor,
            first_key: list[int]) -> None:
        """Join rows prefilled elsewhere (their cache, key mask and last positions; `first_key`
        is the dynamic decoder's and unused here), new rows last. Each takes a free slot, its
        keys written into that slot's columns ending at the cursor and its stale mask cleared,
        so shapes and a captured graph stay. Only when free slots run out or a prompt is
        longer than the cursor do the live rows move to a larger state (and a new graph),
        shifted right so that every row's keys still end at the cursor."""
        new, width = valid.shape
        free = sorted(set(range(self.valid.shape[0])) - set(self.slots))
        if len(free) < new or width > self.length:
            shift = max(width - self.length, 0)
            live = len(self.slots)
            self._rebuild(self.slots, self.valid.shape[1] + shift, live + new, shift)
            self.slots, free = list(range(live)), list(range(live, live + new))
        slots = torch.tensor(free[:new], device=self.device)
        start = self.length - width
        for mine, theirs in ((self.cache.keys, cache.keys), (self.cache.values, cache.values)):
            for layer, tensor in enumerate(theirs):
                mine[layer][slots, :, start:self.length] = tensor[:, :, :width]
        self.valid[slots] = False
        self.valid[slots, start:self.length] = valid
        self.positions[slots] = positions
        self.slots += free[:new]

    # -- the step ------------------------------------------------------------------------

    def _forward(self) -> ForwardOutput:
        return self.model(self.audio, self.text, self.positions, self.valid, self.cache,
                          with_mimo=self.with_mimo, last_only=True)

    def _run(self) -> ForwardOutput:
        if not self.cuda_graph:
            return self._forward()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as exc:  # keep decoding, eagerly, rather than fail the batch
                log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
                self.cuda_graph, self.graph = False, None
                return self._forward()
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (workspaces, autotuning)
            self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._forward()
        self.graph = graph

    def step(self, audio_ids: Sequence[int], text_ids: Sequence[int]) -> ForwardOutput:
        if self.length >= self.valid.shape[1]:  # every slot keeps its place
            self._rebuild(list(range(self.valid.shape[0])), self.valid.shape[1] + self.chunk)
        batch = self.valid.shape[0]
        slots = torch.tensor(self.slots)
        for buffer, ids in ((self.audio, audio_ids), (self.text, text_ids)):
            host = torch.full((batch,), self.blank, dtype=torch.long)
            host[slots] = torch.tensor(list(ids), dtype=torch.long)
            buffer.copy_(host[:, None])
        self.positions += 1
        self.valid[:, self.length] = True
        self.cache.write_at.fill_(self.length)
        out = self._run()
        self.length += 1
        live = slots.to(self.device)
        return ForwardOutput(out.text_logits.index_select(0, live),
                             None if out.audio_logits is None
                             else out.audio_logits.index_select(0, live))
