"""Reading what a flow published."""

from __future__ import annotations


async def artifacts(keys) -> dict:
    """The artifacts with these keys on the current Prefect API, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
    return {a.key: a for a in found}
