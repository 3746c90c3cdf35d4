"""The embedded local stack behind ``kimi-label stack up|down|status``: SeaweedFS S3, and optionally
a Prefect server and a Ray head, as detached processes on 127.0.0.1 that outlive the caller.

Every socket binds 127.0.0.1, and every process is found and stopped by its PID and start time
(never by name, never with ``ray stop``). The modules, one job each:

  stack            ``stack_up`` / ``stack_down`` / ``stack_status`` and the lock on a home
  state            the home folder: stack.json, credentials, the Ray token; ``env()`` for clients
  supervision      spawning detached services, finding their member processes, stopping them
  ports, probes    which ports services get and who listens; whether a service answers
  s3_service       the stack's S3, a `SeaweedS3` handed over to run on its own
  prefect_server   the stack's Prefect server and its UI
  ray_head         the stack's Ray head, its dashboard and Jobs API
  seaweed          ``SeaweedS3``: one ``weed mini`` S3 server (also what the tests use)
  seaweed_config   its ports, identities, binary and command line

Processes themselves (identity immune to PID reuse, free ports) are `pipelines.processes`.
"""

from pipelines.errors import StackError
from pipelines.local_stack.ports import listening_addresses
from pipelines.local_stack.seaweed import SeaweedS3
from pipelines.local_stack.seaweed_config import (
    S3Identity,
    SeaweedError,
    find_weed_binary,
    pick_ports,
)
from pipelines.local_stack.stack import stack_down, stack_status, stack_up
from pipelines.local_stack.state import ServiceState, StackState
from pipelines.local_stack.supervision import MARKER_ENV

__all__ = [
    "MARKER_ENV",
    "S3Identity",
    "SeaweedError",
    "SeaweedS3",
    "ServiceState",
    "StackError",
    "StackState",
    "find_weed_binary",
    "listening_addresses",
    "pick_ports",
    "stack_down",
    "stack_status",
    "stack_up",
]
