"""``kimi-label stack up|down|status``: start, stop and report the stack of one home folder.

Contract:
  * ``up`` is idempotent: live services are kept, dead ones are cleaned up and restarted (on their
    old ports when free), missing ones started; it never stops a running service. A service
    restarted after ``down`` also takes its old ports when free, so the endpoints a user exported
    (AWS_ENDPOINT_URL, PREFECT_API_URL) stay right. ``up`` that fails stops what it started.
  * ``down`` is idempotent, stops every process of every service by PID (Ray's workers
    included) and keeps the data, credentials and logs.
  * A lock file serialises concurrent ``up``/``down`` on one home.
  * ``status`` reports per service whether its main processes run and whether it answers a real
    probe, its PIDs, ports, URLs (APIs, the Prefect UI, the Ray dashboard) and log; it never
    contains a secret.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.errors import StackError
from pipelines.local_stack import prefect_server, ray_head, s3_service
from pipelines.local_stack.state import (
    RAY_TOKEN_FILE,
    SERVICES,
    STATE_FILE,
    ServiceState,
    StackState,
    ensure_secrets,
    last_ports,
    record_ports,
    resolve_home,
)
from pipelines.local_stack.supervision import STOP_TIMEOUT_S

LOCK_FILE = ".stack.lock"
CRASHED_STOP_TIMEOUT_S = 2.0  # remnants of a half-dead service (a raylet without its GCS) hang
_STOP = {"s3": s3_service.stop_s3, "prefect": prefect_server.stop_prefect,
         "ray": ray_head.stop_ray}


@contextlib.contextmanager
def _locked(home: Path):
    with open(home / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stop_service(svc: ServiceState, stack_id: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop every member of a service and clean up after it; True when something was running."""
    return _STOP[svc.name](svc, stack_id, timeout_s)


def _drop_dead(state: StackState, previous: dict[str, dict[str, int]]) -> bool:
    """Stop the remnants of services that no longer run (crashed or killed) and forget them,
    keeping their ports in `previous` for the restart. True when one was dropped."""
    dead = [name for name, svc in state.services.items() if not svc.running()]
    for name in dead:
        stop_service(state.services[name], state.stack_id, timeout_s=CRASHED_STOP_TIMEOUT_S)
        previous[name] = state.services.pop(name).ports
    return bool(dead)


def _start(state: StackState, wanted: list[str], s3_port: int | None,
           previous: dict[str, dict[str, int]], ray_cpus: int | None) -> list[ServiceState]:
    """Start the `wanted` services; when one fails, stop those started and re-raise."""
    home, stack_id = state.home, state.stack_id
    taken = {p for svc in state.services.values() for p in svc.ports.values()}
    started: list[ServiceState] = []
    try:
        if "prefect" in wanted:  # the slowest (~12 s): boots while the others start
            started.append(prefect_server.launch_prefect(home, stack_id, taken,
                                                         previous.get("prefect", {})))
        if "s3" in wanted:
            ports = s3_service.choose_ports(s3_port, previous.get("s3", {}))
            started.append(s3_service.start_s3(home, stack_id, state.credentials, ports))
        if "ray" in wanted:
            started.append(ray_head.start_ray(home, stack_id, taken, previous.get("ray", {}),
                                              ray_cpus))
        for svc in started:
            if svc.name == "prefect":
                prefect_server.wait_until_healthy(svc, stack_id)
    except BaseException:
        for svc in started:
            with contextlib.suppress(Exception):
                stop_service(svc, stack_id)
        raise
    return started


def _save_survivors(state: StackState) -> None:
    """After a failed ``up``: the services that were already running, or no state at all."""
    if state.services:
        state.save()
    else:
        (state.home / STATE_FILE).unlink(missing_ok=True)


def stack_up(
    home: str | os.PathLike,
    prefect: bool = False,
    ray: bool = False,
    s3_port: int | None = None,
    ray_cpus: int | None = None,
) -> StackState:
    """Start S3 (always), Prefect and/or Ray unless already running; return the whole state.
    The Ray head offers `ray_cpus` CPUs (default: those of this machine)."""
    home = resolve_home(home)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    with _locked(home):
        creds = ensure_secrets(home)
        state = StackState.load(home) or StackState(home=home, stack_id=secrets.token_hex(8))
        state.credentials = creds
        previous = last_ports(home)
        dropped = _drop_dead(state, previous)
        s3 = state.services.get("s3")
        if s3 is not None and s3_port and s3.ports["s3"] != s3_port:
            raise StackError(f"S3 already runs on port {s3.ports['s3']}, not {s3_port}; "
                             "run `stack down` first")
        head = state.services.get("ray")
        if head is not None and ray_cpus and head.extra.get("num_cpus") != ray_cpus:
            raise StackError(f"Ray already runs with {head.extra.get('num_cpus')} CPUs, not "
                             f"{ray_cpus}; run `stack down` first")
        wanted = [n for n, on in (("s3", True), ("prefect", prefect), ("ray", ray))
                  if on and n not in state.services]
        if not wanted:
            if dropped:  # dead services were dropped and are not wanted again
                state.save()
            return state
        try:
            started = _start(state, wanted, s3_port, previous, ray_cpus)
        except BaseException:
            _save_survivors(state)
            raise
        state.services.update((svc.name, svc) for svc in started)
        state.services = {n: state.services[n] for n in SERVICES if n in state.services}
        state.save()
        return state


def stack_down(home: str | os.PathLike) -> list[str]:
    """Stop every process ``up`` started (by PID, Ray's daemons and workers included) and remove
    stack.json. Returns the services that had running processes; [] when nothing ran."""
    home = resolve_home(home)
    if not (home / STATE_FILE).exists():
        return []
    with _locked(home):
        state = StackState.load(home)
        if state is None:
            return []
        names = list(state.services)
        with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
            results = list(pool.map(lambda n: stop_service(state.services[n], state.stack_id),
                                    names))
        record_ports(home, {n: state.services[n].ports for n in names})
        (home / STATE_FILE).unlink(missing_ok=True)
        return [n for n, was_running in zip(names, results) if was_running]


def _health(state: StackState, svc: ServiceState) -> tuple[bool, str]:
    if svc.name == "s3":
        return s3_service.health(state)
    if svc.name == "prefect":
        return prefect_server.health(svc)
    return ray_head.health(svc)


def _service_report(state: StackState, svc: ServiceState | None) -> dict:
    if svc is None:
        return {"running": False, "healthy": False, "endpoint": None, "urls": {}}
    running = svc.running()
    entry = {
        "running": running,
        "healthy": False,
        "endpoint": svc.endpoint,
        "urls": svc.urls,
        "ports": svc.ports,
        "pids": [p.pid for p in svc.members(state.stack_id)] if running else [],
        "log": svc.log,
    }
    if svc.name == "ray":
        entry["num_cpus"] = svc.extra.get("num_cpus")
        entry["auth_token_file"] = str(state.home / RAY_TOKEN_FILE)  # the dashboard asks for it
    if running:
        entry["healthy"], entry["detail"] = _health(state, svc)
    else:
        entry["detail"] = "not running (stale state; `stack down` or `stack up` cleans it)"
    return entry


def stack_status(home: str | os.PathLike) -> dict:
    """Per service: running (main PIDs alive), healthy (a real probe), endpoint, live PIDs.
    JSON-serialisable; never contains a secret."""
    home = resolve_home(home)
    state = StackState.load(home)
    services = {name: _service_report(state, state.services.get(name) if state else None)
                for name in SERVICES}
    up = bool(state and state.services) and all(services[n]["running"] for n in state.services)
    return {"home": str(home), "up": up, "services": services}
