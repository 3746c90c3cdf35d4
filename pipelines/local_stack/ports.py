"""Where the stack's services listen: loopback only, in port ranges that keep them apart and out
of the kernel's ephemeral range.

Any outgoing connection on the machine may take a port of the ephemeral range (Linux:
32768-60999) between the moment we find it free and the moment our server binds it; weed mini
binds its S3 gRPC port seconds after it starts, and a restarted store in a CI run died of that
(``bind: address already in use``). So the ranges lie below Linux's default ephemeral range:

  ==============  ======================================================================
  10002-19999     Ray's worker ports (Ray's defaults)
  20000-22767     SeaweedFS HTTP ports (`SEAWEED_HTTP_PORTS`), gRPC at HTTP + 10000:
                  30000-32767
  22768-29999     everything else (`SERVICE_PORT_RANGE`: Prefect, the Ray GCS, Ray's
                  autoscaler metrics)
  ==============  ======================================================================

On a kernel with another ephemeral range, the ports inside it are skipped (`random_port`).
A port this process chose for a server stays claimed (`PortClaims`) while that server is stopped
for a restart, so that another process (a second test worker, a second stack) does not choose it
meanwhile.
"""

from __future__ import annotations

import fcntl
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

from pipelines.errors import StackError
from pipelines.processes import port_free

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS: each HTTP port p has its gRPC port at p + 10000
SEAWEED_HTTP_PORTS = (20000, 22767)
SERVICE_PORT_RANGE = (22768, 29999)
_LINUX_EPHEMERAL = (32768, 60999)
_EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
CLAIMS_DIR = Path(tempfile.gettempdir()) / "kimi-label-ports"  # one lock file per claimed port
_TRIES = 500


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = (int(p) for p in _EPHEMERAL_FILE.read_text().split())
    except (OSError, ValueError):
        return _LINUX_EPHEMERAL
    return low, high


def random_port(span: tuple[int, int], usable: Callable[[int], bool], what: str,
                twin: int = 0) -> int:
    """A random port p of `span` for which `usable` holds, p (and p + `twin`, when given) outside
    the kernel's ephemeral range."""
    low, high = ephemeral_range()
    rng = random.Random()
    for _ in range(_TRIES):
        port = rng.randint(*span)
        if not any(low <= p <= high for p in {port, port + twin}) and usable(port):
            return port
    raise StackError(f"no free port for {what} in {span[0]}-{span[1]} outside the ephemeral "
                     f"range {low}-{high}")


class PortClaims:
    """Ports claimed by this process across processes: an exclusive ``flock`` on one file per
    port in `CLAIMS_DIR`. A claim lasts until `release` or until this object is garbage
    collected (or the process ends): the lock files are closed then."""

    def __init__(self):
        self._held: dict[int, object] = {}

    def take(self, port: int) -> bool:
        """Claim `port`; False when another process holds it (True when we already do)."""
        if port in self._held:
            return True
        CLAIMS_DIR.mkdir(exist_ok=True)
        handle = open(CLAIMS_DIR / str(port), "a")  # held open: the lock lives with it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._held[port] = handle
        return True

    def drop(self, port: int) -> None:
        handle = self._held.pop(port, None)
        if handle is not None:
            handle.close()

    def release(self) -> None:
        for port in list(self._held):
            self.drop(port)


def free_port(taken: set[int], prefer: int | None = None) -> int:
    """A free port in SERVICE_PORT_RANGE and not in `taken` (which gets it); `prefer` (the port
    before a restart) when it is free."""
    if prefer and prefer not in taken and port_free(prefer, HOST):
        taken.add(prefer)
        return prefer
    port = random_port(SERVICE_PORT_RANGE,
                       lambda p: p not in taken and port_free(p, HOST), "a service")
    taken.add(port)
    return port


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
