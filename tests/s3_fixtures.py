"""A real SeaweedFS S3 endpoint for tests. Import the fixtures you use into the test module:

    from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401

``seaweed`` is one ``SeaweedS3`` for the whole session (bucket ``audio`` plus an empty bucket
``spare``, random credentials for ``admin`` and a read-only ``reader`` identity on ``audio``).
``s3_prefix`` is a fresh ``s3://audio/<test>-<hex>`` prefix per test.

pytest registers an imported fixture once per importing module, so a session fixture imported
into three modules would start three servers; a reference count keeps it to one, stopped when
the last user tears down (at the end of the session).
"""

from __future__ import annotations

import re
import uuid

import pytest

from pipelines.local_stack import S3Identity, SeaweedS3

BUCKET = "audio"
SPARE_BUCKET = "spare"

_shared: dict = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> SeaweedS3:
    if _shared["server"] is None:
        server = SeaweedS3(
            tmp_path_factory.mktemp("seaweed"),
            buckets=(BUCKET, SPARE_BUCKET),
            extra_identities=[
                S3Identity.generate("reader", actions=(f"Read:{BUCKET}", f"List:{BUCKET}"))
            ],
        )
        server.start()
        _shared["server"] = server
    _shared["users"] += 1
    try:
        yield _shared["server"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["server"].stop()
            _shared["server"] = None


@pytest.fixture
def s3_prefix(seaweed, request) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
