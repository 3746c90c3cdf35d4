"""Credentials from a Prefect Secret block: the flows' part of `StorageConfig.credentials_block`.

The block's name is a parameter; its values are read when the flow runs (or when the console
checks a run before starting it), held in memory, and reach the job only through
`StorageConfig.with_credentials`, which keeps them out of every dump and report.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel

from pipelines.errors import CredentialsError
from pipelines.storage import Credentials, StorageConfig

Model = TypeVar("Model", bound=BaseModel)


def load_credentials(block_name: str) -> Credentials:
    """The credentials held by the Secret block `block_name`, read now. Errors name the block
    and the fields, never a value."""
    from prefect.blocks.system import Secret

    source = f"credentials block {block_name!r}"
    try:
        value = Secret.load(block_name).get()
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise CredentialsError(f"{source} not found ({exc})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise CredentialsError(f"{source} must hold a JSON object with key and secret")
    return Credentials.from_mapping(value, source)


def with_block_credentials(storage: StorageConfig) -> StorageConfig:
    """`storage` with the credentials of its `credentials_block` (unchanged without one)."""
    if not storage.credentials_block:
        return storage
    return storage.with_credentials(load_credentials(storage.credentials_block))


def with_credentials_read(params: Model) -> Model:
    """`params` (a job's, an evaluation's, a training build's) with the credentials block of
    each of its storage configurations read."""
    return params.model_copy(update={name: with_block_credentials(value)
                                     for name, value in params if isinstance(value,
                                                                             StorageConfig)})
