"""Reading what a flow published."""

from __future__ import annotations


async def artifacts(keys) -> dict:
    """The newest artifact of each of these keys on the current Prefect API (the harness is
    shared by the session: other tests' flows publish under the same keys)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))),
            sort=ArtifactSort.CREATED_DESC, limit=50 * len(keys))
    newest: dict = {}
    for artifact in found:  # newest first
        newest.setdefault(artifact.key, artifact)
    return newest
