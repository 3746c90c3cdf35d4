"""The contract of a stage of the labelling pipeline.

A stage is a step over pyarrow batches that does not know how it is scheduled:

  * `name` names it (and its `StageResources` in `JobSpec.stages`, where it has them);
  * `resources` says how it is scheduled (batch size, CPU/GPU share, concurrency, restarts,
    threads), in one place that the Ray adapter (`pipelines.job.dataset`) turns into
    `map_batches` arguments;
  * `actor` says whether it holds heavy state (a model): an actor stage runs in a pool of
    long-lived actors that each call `setup()` once; a task stage runs as stateless tasks;
  * `setup()` allocates what the stage needs (loads the model, sets torch threads). The
    constructor only stores configuration, so a stage is cheap to build, to validate and to
    ship to workers;
  * `__call__(batch)` takes a pyarrow table and returns one, or yields several (a stage may
    emit a table per object so that Ray stores each before the next is made).

Rows are plain data: URIs, offsets and bytes, never Python objects. A row that cannot be used
becomes an error row (`error_kind`, `error_message`) at the stage that finds out and flows on;
an engine failure is not caught (it kills the worker, and Ray retries it).

`run_in_process(stages, table)` runs stages one after another in this process, without Ray
(tests, and the reference for what the Ray pipeline computes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

import pyarrow as pa

from pipelines.spec import StageResources


class Stage:
    """Base class of the stages (module docstring)."""

    name: ClassVar[str]
    actor: ClassVar[bool] = False
    resources: StageResources = StageResources()

    def setup(self) -> None:
        """Allocate what the stage needs; called once per actor (or task) before any batch."""

    def __call__(self, batch: pa.Table) -> pa.Table | Iterator[pa.Table]:
        raise NotImplementedError


def as_tables(out: pa.Table | Iterable[pa.Table]) -> list[pa.Table]:
    return [out] if isinstance(out, pa.Table) else list(out)


def run_in_process(stages: Sequence[Stage], table: pa.Table) -> pa.Table:
    """`table` through `stages` in this process, each set up first, a batch of the stage's
    batch size at a time."""
    for stage in stages:
        stage.setup()
        size = max(stage.resources.batch_size, 1)
        parts = [t for start in range(0, max(table.num_rows, 1), size)
                 for t in as_tables(stage(table.slice(start, size)))]
        table = pa.concat_tables(parts) if parts else table.slice(0, 0)
    return table


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # buffers of this size and more get their own mapping


def _glibc():
    """The C library when it is glibc (its `malloc_trim` and `mallopt`), else None."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


_libc = None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`). A front-end batch
    allocates and frees hundreds of MB of differently sized buffers; glibc keeps freed heap
    memory, fragmented, so an actor's footprint would creep up over a long corpus."""
    if libc := _glibc():
        libc.malloc_trim(0)


def keep_large_buffers_off_the_heap() -> None:
    """Serve every allocation of MMAP_THRESHOLD bytes or more from a mapping of its own,
    unmapped when freed. glibc's threshold otherwise climbs (up to 32 MB) as large buffers are
    freed, and from then on a batch's tensors (the front-end's log-mel alone is 12 MB) are cut
    from the heap, which fragments: the front-end actor's peak RSS rose 8-14 % from 40 to 400
    short files (`bench/load.py`); with the fixed threshold it rose about 2 %, from 80 MB lower.
    Not glibc: nothing to do."""
    if libc := _glibc():
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads in this actor (None: what Ray set, its whole CPUs, at least 1)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def error_row(row: dict, kind: str, message: str) -> dict:
    """`row` marked as failed with `kind` (stable, machine-readable) and `message`."""
    row.update(error_kind=kind, error_message=message)
    return row
