"""Read stage: work units (plan shard path, start, stop) -> those rows of the plan shard
(uri, size, etag). Run as a plain map task with the decode stage's CPU share: Ray's
`read_parquet` asks for a whole CPU per task, which small nodes full of actors never free.

Its tasks are not limited in number, which also keeps Ray Data from fusing it with the decode
stage: a fused task would decode a whole unit's objects (32) before Ray Data could hold it back,
and the front-end actor then touched 9x the shared memory at 10x the files (past the in-flight
budget); unfused, decode tasks take a batch of the unit's rows at a time."""

from __future__ import annotations

import pyarrow as pa

from pipelines.spec import StageResources
from pipelines.stages.base import Stage
from pipelines.storage import RetryPolicy, StorageConfig, read_parquet, resolve

PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])


class PlanReader(Stage):
    name = "read"

    def __init__(self, output: str, storage: StorageConfig | None,
                 retry: RetryPolicy | None = None, resources: StageResources | None = None):
        self.output = output
        self.storage = storage
        self.retry = retry
        self.resources = (resources or StageResources()).model_copy(
            update={"batch_size": 1, "concurrency": None})

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not batch.num_rows:
            return PLAN_SCHEMA.empty_table()
        fs, _ = resolve(self.output, self.storage)
        return pa.concat_tables([
            read_parquet(fs, unit["plan_shard"], None, self.retry).slice(
                unit["start"], unit["stop"] - unit["start"])
            for unit in batch.to_pylist()])
