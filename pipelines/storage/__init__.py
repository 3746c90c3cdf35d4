"""The storage layer: where audio comes from and where labels go, over fsspec (s3fs for S3).

One module a job each:
  uri         how a location is spelled; `canonical_uri`, the one spelling of an object
  config      `StorageConfig`: endpoint, credentials (environment, explicit, a Prefect Secret
              block's values), other fsspec options, and how they reach workers
  filesystem  `resolve(uri, storage)` -> (fsspec filesystem, path)
  errors      `StorageError` (a stable `kind`), translated from whatever the backend raised
  retry       `RetryPolicy` and `retrying`: bounded, jittered backoff while the store is down
  listing     `list_objects`, streamed; `ObjectInfo` (uri, size, etag, mtime)
  manifest    `read_manifest`: Parquet/CSV/JSONL files naming the objects
  access      pre-flight: `open_input`, `check_output`
  reading     `fetch` and `fetched` (a local file for a large object); `opened_head`, a header
  tables      Parquet shards read one at a time, written staged and moved into place
  layout      `OutputLayout`: the only code that spells files/, segments/, _runs/<id>/...
  lease       one running job per output (`OutputLease`, a conditional create)
"""

from pipelines.storage.access import InputInfo, check_output, open_input
from pipelines.storage.config import Credentials, StorageConfig, StorageOptions
from pipelines.storage.errors import ObjectVanishedError, StorageError, storage_error
from pipelines.storage.filesystem import is_local_fs, resolve, uri_of
from pipelines.storage.layout import OutputLayout, shard_name
from pipelines.storage.listing import AUDIO_EXTENSIONS, ObjectInfo, list_objects
from pipelines.storage.manifest import is_manifest, read_manifest
from pipelines.storage.reading import HEAD_BYTES, SPOOL_BYTES, fetch, fetched, opened_head
from pipelines.storage.retry import DEFAULT_RETRY, RetryPolicy, StorageRetry, retrying
from pipelines.storage.tables import (parquet_files, read_available, read_parquet, read_schema,
                                      read_table_dir, this_run, write_atomic,
                                      write_parquet_atomic)
from pipelines.storage.uri import canonical_uri, redact_uri

__all__ = [
    "AUDIO_EXTENSIONS", "DEFAULT_RETRY", "HEAD_BYTES", "SPOOL_BYTES", "Credentials", "InputInfo",
    "ObjectInfo", "ObjectVanishedError", "OutputLayout", "RetryPolicy", "StorageConfig",
    "StorageError", "StorageOptions", "StorageRetry", "canonical_uri", "check_output", "fetch", "fetched", "is_local_fs",
    "is_manifest", "list_objects", "open_input", "opened_head", "parquet_files", "read_available",
    "read_manifest", "read_parquet", "read_schema", "read_table_dir", "redact_uri", "resolve", "retrying", "shard_name",
    "storage_error", "this_run", "uri_of", "write_atomic", "write_parquet_atomic",
]
