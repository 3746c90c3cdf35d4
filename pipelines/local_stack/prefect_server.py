"""The stack's Prefect server: ``prefect server start`` on 127.0.0.1, its database in home.

Contract:
  * ``PREFECT_HOME`` is ``home/prefect`` (SQLite database); the output goes to
    ``home/prefect.log``. Analytics are off, the UI is served at ``http://127.0.0.1:<port>/``
    (it talks to the API beside it), and none of the caller's ``PREFECT_*`` settings reach
    the server.
  * Starting is in two steps, so the slowest service (about 12 s) boots while the others start:
    ``launch_prefect`` spawns it, ``wait_until_healthy`` waits for ``/api/health``.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.errors import StackError
from pipelines.local_stack.ports import HOST, free_port
from pipelines.local_stack.probes import probe_http
from pipelines.local_stack.state import ServiceState
from pipelines.local_stack.supervision import (
    STOP_TIMEOUT_S,
    find_executable,
    log_tail,
    service_env,
    spawn_detached,
    stop_members,
)
from pipelines.processes import ProcessIdentity, identify

START_TIMEOUT_S = 120.0


def launch_prefect(home: Path, stack_id: str, taken: set[int],
                   prefer: dict[str, int]) -> ServiceState:
    """Start the server (on `prefer["api"]` when free) without waiting for it."""
    port = free_port(taken, prefer.get("api"))
    prefect_home = home / "prefect"
    prefect_home.mkdir(exist_ok=True)
    log = home / "prefect.log"
    env = service_env(f"{stack_id}/prefect", {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
    })
    cmd = [find_executable("prefect"), "server", "start", "--host", HOST, "--port", str(port),
           "--analytics-off"]
    proc = spawn_detached(cmd, env, log, prefect_home)
    me = identify(proc.pid) or ProcessIdentity(proc.pid, -1.0)
    return ServiceState(
        name="prefect", session=proc.pid, session_start=me.start, main=[me], pids=[me],
        ports={"api": port}, endpoint=f"http://{HOST}:{port}/api", log=str(log),
        urls={"api": f"http://{HOST}:{port}/api", "ui": f"http://{HOST}:{port}/"},
        extra={"prefect_home": str(prefect_home)},
    )


def health(svc: ServiceState) -> tuple[bool, str]:
    return probe_http(svc.endpoint + "/health")


def wait_until_healthy(svc: ServiceState, stack_id: str) -> None:
    """Until ``/api/health`` answers; StackError (with the log's tail) when the server exits
    or stays unhealthy past START_TIMEOUT_S. Then records every member in ``svc.pids``."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    while True:
        if not svc.running():
            raise StackError(f"the Prefect server exited during start-up; log tail "
                             f"({svc.log}):\n{log_tail(Path(svc.log))}")
        ok, last = health(svc)
        if ok:
            break
        if time.monotonic() > deadline:
            raise StackError(f"Prefect at {svc.endpoint} not healthy after "
                             f"{START_TIMEOUT_S:.0f} s (last: {last}); log tail "
                             f"({svc.log}):\n{log_tail(Path(svc.log))}")
        time.sleep(0.3)
    svc.pids = svc.members(stack_id)


def stop_prefect(svc: ServiceState, stack_id: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop every process of the server; True when something was running."""
    return stop_members(lambda: svc.members(stack_id), timeout_s)
