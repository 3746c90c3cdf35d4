"""The stack's S3: a `SeaweedS3` on ``home/s3`` with the stack's credentials, left running.

Contract:
  * One bucket, ``audio``; the credentials are the stack's (credentials.json), enforced.
  * The server is started by `SeaweedS3` (which waits until it serves) and then released: it
    runs on after the caller exits, and is stopped by PID like every other service.
  * A restart keeps the endpoint a user exported: every port as before when all are free, else
    at least the S3 port, unless the caller asks for another one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.errors import StackError
from pipelines.local_stack.ports import HOST
from pipelines.local_stack.probes import probe_s3_bucket
from pipelines.local_stack.seaweed import PID_FILE, SeaweedS3
from pipelines.local_stack.seaweed_config import SeaweedError, pick_ports, remove_grpc_sockets
from pipelines.local_stack.state import BUCKET, REGION, ServiceState, StackState
from pipelines.local_stack.supervision import MARKER_ENV, STOP_TIMEOUT_S, stop_members
from pipelines.processes import identify

START_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)


def choose_ports(requested: int | None, previous: dict[str, int]) -> dict[str, int] | None:
    """Ports to start on: the S3 port `requested`; else the `previous` ports when all are free,
    else its S3 port when free; else None (any free ports)."""
    if requested:
        return {"s3": requested}
    if not previous.get("s3"):
        return None
    for keep in (previous, {"s3": previous["s3"]}):
        try:
            return pick_ports(HOST, keep)
        except (SeaweedError, ValueError) as exc:  # busy (e.g. TIME_WAIT), claimed, or stale
            why = exc
    log.warning("S3 cannot serve on its last port %d (%s): it gets another one; a client that "
                "exported AWS_ENDPOINT_URL needs the new one", previous["s3"], why)
    return None


def start_s3(home: Path, stack_id: str, creds: dict,
             ports: dict[str, int] | None) -> ServiceState:
    """Start SeaweedFS on `ports` (None: any free ones) and hand it over to run on its own."""
    server = SeaweedS3(
        home / "s3",
        buckets=(BUCKET,),
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        ports=ports,
        region=REGION,
        start_timeout_s=START_TIMEOUT_S,
        extra_env={MARKER_ENV: f"{stack_id}/s3"},
    )
    try:
        server.start()
    except SeaweedError as exc:
        raise StackError(f"S3 (SeaweedFS) did not start: {exc}") from exc
    me = identify(server.release().pid)
    if me is None:
        raise StackError("SeaweedFS exited right after start-up")
    return ServiceState(
        name="s3", session=me.pid, session_start=me.start, main=[me], pids=[me],
        ports=dict(server.ports), endpoint=server.endpoint_url, log=str(server.log_path),
        urls={"s3": server.endpoint_url}, extra={"bucket": BUCKET, "data_dir": str(server.data_dir)},
    )


def health(state: StackState) -> tuple[bool, str]:
    """A signed HEAD of the bucket with the stack's credentials."""
    return probe_s3_bucket(state.endpoint_url, state.region, state.credentials["access_key"],
                           state.credentials["secret_key"], BUCKET)


def stop_s3(svc: ServiceState, stack_id: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server and remove what weed leaves behind (its pid file, its gRPC unix
    sockets); True when it was running."""
    was_running = stop_members(lambda: svc.members(stack_id), timeout_s)
    (Path(svc.extra["data_dir"]) / PID_FILE).unlink(missing_ok=True)
    remove_grpc_sockets(svc.ports)
    return was_running
