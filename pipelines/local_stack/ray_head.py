"""The stack's Ray head: ``ray start --head`` on 127.0.0.1, with a token, stopped by PID.

Contract:
  * ``ray start`` rewrites ``--node-ip-address=127.0.0.1`` to the machine's routable address
    unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode), and a client rewrites
    ``127.0.0.1:port`` the same way; so the head runs with it and ``StackState.env()`` hands it
    to clients. It must be in the environment before ``import ray``.
  * Ray's unix sockets must stay under 107 bytes, so when ``home/ray`` is too long Ray is given
    ``/tmp/kl-ray-<hash of home>``, a symlink to it that lives while Ray runs (in stack.json).
  * The service runs while its GCS and raylet run. Stopping follows ``ray stop``'s order (the
    raylet first, as its agents fate-share with it; the GCS last), by PID: ``ray stop`` itself
    is never used, as it kills every Ray process of the user.
  * The head serves the dashboard and the Jobs API (``http://127.0.0.1:<dashboard>``); every
    port it opens (GCS, dashboard, its agents, metrics, runtime-env agent, autoscaler metrics)
    is chosen here from the stack's range, so two stacks on one host never share one (Ray's
    defaults, 8265 and 52365, are fixed). Its CPUs are this machine's unless given.
  * A job submitted to it runs `python` from this environment (its folder leads the head's
    PATH), so `python -m pipelines.job` finds the project.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from pipelines.errors import StackError
from pipelines.local_stack.ports import HOST, free_port
from pipelines.local_stack.probes import port_open, probe_http
from pipelines.local_stack.state import RAY_AUTH_MODE, ServiceState, ray_client_env
from pipelines.local_stack.supervision import (
    STOP_TIMEOUT_S,
    find_executable,
    log_tail,
    process_name,
    reap,
    service_env,
    spawn_detached,
    stop_members,
)
from pipelines.processes import ProcessIdentity, identify

START_TIMEOUT_S = 90.0
START_ATTEMPTS = 2
STARVED = "The current node timed out during startup"  # `ray start`'s error, see start_ray
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store must fit in sun_path (107 bytes).
RAY_TEMP_DIR_MAX = 40
MAIN_PROCESSES = ("gcs_server", "raylet")
# every port the head opens, by its `ray start` flag; "gcs" is its --port
PORT_FLAGS = {
    "gcs": "--port",
    "dashboard": "--dashboard-port",
    "dashboard_agent": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "metrics_export": "--metrics-export-port",
    "runtime_env_agent": "--runtime-env-agent-port",
    # Ray starts its Ray Client server whenever grpc is there (ray[default]), else on 10001
    "ray_client": "--ray-client-server-port",
}


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ray_temp_dir(home: Path) -> Path:
    """``home/ray``, or a short symlink to it in /tmp when that path is too long for sockets."""
    inside = home / "ray"
    inside.mkdir(mode=0o700, exist_ok=True)
    if len(str(inside)) <= RAY_TEMP_DIR_MAX:
        return inside
    link = Path("/tmp") / f"kl-ray-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"
    if not link.is_symlink() and not link.exists():
        link.symlink_to(inside, target_is_directory=True)
    if not link.is_symlink() or os.readlink(link) != str(inside):
        raise StackError(f"{link} exists and is not this stack's link to {inside}")
    return link


def _launch(home: Path, stack_id: str, taken: set[int], prefer: dict[str, int],
            cpus: int) -> tuple[subprocess.Popen, ServiceState]:
    ports = {name: free_port(taken, prefer.get(name)) for name in PORT_FLAGS}
    # The autoscaler's metrics port is otherwise a fixed 44217, shared by every Ray on the host.
    ports["autoscaler_metrics"] = free_port(taken, prefer.get("autoscaler_metrics"))
    temp_dir = ray_temp_dir(home)
    log = home / "ray.log"
    env = service_env(f"{stack_id}/ray", {
        **ray_client_env(home, RAY_AUTH_MODE),
        "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    })
    cmd = [find_executable("ray"), "start", "--head", f"--node-ip-address={HOST}",
           *(f"{flag}={ports[name]}" for name, flag in PORT_FLAGS.items()),
           f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           f"--dashboard-host={HOST}", "--disable-usage-stats"]
    launcher = spawn_detached(cmd, env, log, home)  # forks the daemons into its session, exits
    me = identify(launcher.pid) or ProcessIdentity(launcher.pid, -1.0)
    svc = ServiceState(
        name="ray", session=launcher.pid, session_start=me.start, main=[], pids=[],
        ports=ports, endpoint=f"{HOST}:{ports['gcs']}", log=str(log),
        urls={"gcs": f"{HOST}:{ports['gcs']}", "dashboard": f"http://{HOST}:{ports['dashboard']}"},
        extra={"temp_dir": str(temp_dir), "num_cpus": cpus},
    )
    return launcher, svc


def start_ray(home: Path, stack_id: str, taken: set[int], prefer: dict[str, int],
              cpus: int | None = None) -> ServiceState:
    """Start the head with `cpus` CPUs (default: `machine_cpus()`), on the ports of `prefer`
    where free, and wait until ``ray start`` is done (it waits for the dashboard) and the GCS
    accepts connections; on failure stop what started and raise StackError.

    Ray gives its raylet a fixed 30 s to register with the GCS; on a CPU-starved machine
    (the dashboard's dozen processes start meanwhile) it can miss that, and ``ray start``
    fails with "timed out during startup": that start is tried once more."""
    for attempt in range(START_ATTEMPTS):
        launcher, svc = _launch(home, stack_id, taken, prefer, cpus or machine_cpus())
        try:
            code = launcher.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        reap(launcher.pid)
        svc.pids = svc.members(stack_id)
        if code == 0:
            break
        stop_ray(svc, stack_id)
        tail = log_tail(Path(svc.log))
        if STARVED not in tail or attempt + 1 == START_ATTEMPTS:
            raise StackError(f"`ray start --head` "
                             f"{'timed out' if code is None else f'exit {code}'}; "
                             f"log tail ({svc.log}):\n{tail}")
    by_name = {process_name(p.pid): p for p in svc.pids}
    svc.main = [by_name[n] for n in MAIN_PROCESSES if n in by_name]
    if len(svc.main) != len(MAIN_PROCESSES) or not port_open(HOST, svc.ports["gcs"]):
        stop_ray(svc, stack_id)
        raise StackError(f"Ray head did not come up (gcs_server/raylet missing or port "
                         f"{svc.ports['gcs']} closed); log tail ({svc.log}):\n"
                         f"{log_tail(Path(svc.log))}")
    return svc


def health(svc: ServiceState) -> tuple[bool, str]:
    """The GCS accepts connections and the dashboard (with the Jobs API) answers."""
    if not port_open(HOST, svc.ports["gcs"]):
        return False, f"GCS {svc.endpoint} refuses connections"
    dashboard = svc.urls.get("dashboard")
    if dashboard is None:  # a head started before the dashboard was served
        return True, f"GCS {svc.endpoint} accepts connections (no dashboard)"
    ok, said = probe_http(dashboard + "/api/gcs_healthz")
    return ok, f"GCS {svc.endpoint} accepts connections; dashboard {dashboard}: " + (
        "answers" if ok else said)


def _stop_order(processes: list[ProcessIdentity]) -> list[list[ProcessIdentity]]:
    first = [p for p in processes if process_name(p.pid) == "raylet"]
    last = [p for p in processes if process_name(p.pid) == "gcs_server"]
    return [first, [p for p in processes if p not in first and p not in last], last]


def stop_ray(svc: ServiceState, stack_id: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop every process of the head, its workers included, and remove what Ray leaves behind
    (its current-cluster file, the short temp-dir link); True when something was running."""
    was_running = stop_members(lambda: svc.members(stack_id), timeout_s, _stop_order)
    temp_dir = Path(svc.extra["temp_dir"])
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    if temp_dir.is_symlink():
        temp_dir.unlink()
    return was_running
