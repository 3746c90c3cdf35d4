"""Retries are ours, in one place: `retrying` runs an operation under a `RetryPolicy`.

botocore is told to try once (`pipelines.storage.filesystem.resolve`), so retries never nest.
Listings retry page by page, reads and the pre-flight checks as a whole; callers wrap their own
filesystem calls (the job's plan and shard writes) in `retrying` with the job's policy.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from pydantic import Field

from pipelines.storage.errors import StorageError, storage_error

log = logging.getLogger("pipelines.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long a storage operation keeps trying while the store is unavailable.

    Attempt ``n`` (from 1) that fails with a retryable error waits ``d/2 + uniform(0, d/2)``
    with ``d = min(max_delay_s, base_delay_s * 2**(n-1))``, then tries again, until
    ``attempts`` tries were made or the next try would start more than ``budget_s`` after the
    first. Then it raises ``StorageError`` of kind ``unavailable`` saying so. Defaults ride out
    a store restart of about a minute.
    """

    attempts: int = 12
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    budget_s: float = 90.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.base_delay_s, self.max_delay_s, self.budget_s) < 0:
            raise ValueError("delays and budget must not be negative")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The pause after failed attempt ``attempt`` (1-based): exponential, half jittered."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


DEFAULT_RETRY = RetryPolicy()


def retrying(call: Callable[[], T], uri: str, storage=None, action: str = "access",
             policy: RetryPolicy | None = None) -> T:
    """``call()`` under ``policy``; any failure comes out as a ``StorageError`` naming ``uri``.

    Only ``unavailable`` errors are retried; every retry is logged (WARNING, no secrets) and
    counted in the error's ``attempts``. ``call`` must be safe to repeat (a whole read, a
    listing page, a staged write that is moved into place). ``storage`` (a StorageConfig or
    s3fs options) names the secrets to keep out of messages.
    """
    policy = policy or DEFAULT_RETRY
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - every backend error becomes a StorageError
            err = storage_error(exc, uri, storage, action)
        err.attempts = attempt
        if not err.retryable:
            raise err from None
        elapsed = time.monotonic() - started
        pause = policy.delay(attempt)
        if attempt >= policy.attempts or elapsed + pause > policy.budget_s:
            raise StorageError(uri, f"{err.reason}; gave up after {attempt} attempt(s) in "
                                    f"{elapsed:.1f} s (retry budget: {policy.attempts} attempts, "
                                    f"{policy.budget_s:g} s)", err.kind, attempt) from None
        log.warning("storage %s: %s (attempt %d of %d); retrying in %.2f s",
                    err.kind, err, attempt, policy.attempts, pause)
        time.sleep(pause)


StorageRetry = Annotated[RetryPolicy, Field(
    default_factory=RetryPolicy,
    description="JSON: how long storage calls retry while the store is unavailable (attempts, "
                "base_delay_s, max_delay_s, budget_s)")]
"""The `storage_retry` field of a parameter model."""
