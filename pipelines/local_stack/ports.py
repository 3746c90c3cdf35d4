"""Where the stack's services listen: loopback only, in port ranges that keep them apart.

Ray gives its workers ports 10002-19999; SeaweedFS takes HTTP ports in 20000-29999 with gRPC
at HTTP + 10000 (`seaweed_config`); everything else (Prefect, the Ray GCS and Ray's autoscaler
metrics) takes ports in 40000-49999.
"""

from __future__ import annotations

import random

import psutil

from pipelines.errors import StackError
from pipelines.processes import port_free

HOST = "127.0.0.1"
SERVICE_PORT_RANGE = (40000, 49999)
_TRIES = 500


def free_port(taken: set[int], prefer: int | None = None) -> int:
    """A free port in SERVICE_PORT_RANGE and not in `taken` (which gets it); `prefer` (the port
    before a restart) when it is free."""
    if prefer and prefer not in taken and port_free(prefer, HOST):
        taken.add(prefer)
        return prefer
    rng = random.Random()
    for _ in range(_TRIES):
        port = rng.randint(*SERVICE_PORT_RANGE)
        if port in taken or not port_free(port, HOST):
            continue
        taken.add(port)
        return port
    raise StackError(f"no free port in {SERVICE_PORT_RANGE}")


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on; [] once it is gone. Raises
    PermissionError where the system does not show us its sockets."""
    try:
        process = psutil.Process(pid)
        # psutil 6 renamed connections() to net_connections()
        connections = getattr(process, "net_connections", None) or process.connections
        return sorted((c.laddr.ip, c.laddr.port) for c in connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN)
    except psutil.NoSuchProcess:
        return []
    except psutil.AccessDenied as exc:
        raise PermissionError(f"the sockets of process {pid} cannot be read") from exc
