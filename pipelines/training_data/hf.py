"""The HF dataset export: per split, Parquet shards with an `audio` column, a `datasets.Audio`
feature (16 kHz FLAC bytes), before the label columns of the Parquet shard of the same number.

    from datasets import load_dataset
    ds = load_dataset("parquet", data_dir="<output>/hf")   # splits train and validation
    ds["train"][0]["audio"]                                  # decoded by datasets (torchcodec)

`datasets` is not needed to write it: the feature is declared in the schema's `huggingface`
metadata, as datasets itself declares it (the audio column only: datasets infers the others
from their Arrow types). A shard is written into a local file a row group (at most
`ROWS_PER_ROW_GROUP` segments, as the exports hand them over) at a time, so a build holds one
row group's audio, whatever the shard's size; it is uploaded when it is complete.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.training_data.audio import SAMPLE_RATE

AUDIO_COLUMN = "audio"
AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Audio's
ROWS_PER_ROW_GROUP = 100  # small row groups, as datasets writes audio: one is read at a time


def hf_schema(training: pa.Schema) -> pa.Schema:
    """The training shards' schema with the audio column first, declared as `Audio`."""
    features = {"info": {"features": {AUDIO_COLUMN: {"sampling_rate": SAMPLE_RATE,
                                                     "_type": "Audio"}}}}
    return pa.schema([pa.field(AUDIO_COLUMN, AUDIO_TYPE), *training],
                     metadata={**(training.metadata or {}),
                               b"huggingface": json.dumps(features).encode()})


class HfShardFile:
    """One HF shard being written to the local file `path`, a row group per `write`."""

    def __init__(self, path: str, training: pa.Schema):
        self.schema = hf_schema(training)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, rows: pa.Table, flacs: list[bytes]) -> None:
        """`rows` of the training schema, with each row's FLAC file."""
        names = pa.array([f"{key}.flac" for key in rows["key"].to_pylist()], pa.string())
        audio = pa.StructArray.from_arrays([pa.array(flacs, pa.binary()), names],
                                           fields=list(AUDIO_TYPE))
        table = pa.Table.from_arrays([audio, *rows.columns], schema=self.schema)
        self.writer.write_table(table, row_group_size=max(rows.num_rows, 1))

    def close(self) -> None:
        self.writer.close()
