"""The embedded local stack behind ``kimi-label stack up|down|status``: SeaweedFS S3, and optionally
a Prefect server and a Ray head, as detached processes on 127.0.0.1 that outlive the caller.

Contract:
  * Everything lives in ``home`` (mode 0700)::

        credentials.json   S3 access key/secret, generated once, reused by every ``up`` (0600)
        ray_auth_token     Ray's token (RAY_AUTH_MODE=token), generated once (0600)
        stack.json         per service: PIDs, ports, endpoints, logs; never a secret
        s3/                SeaweedFS data, weed.log and its identities file s3.json (0600)
        prefect/           PREFECT_HOME of the server (SQLite database); prefect.log beside it
        ray/               Ray's --temp-dir (session logs); ray.log is the output of ``ray start``

    Ray's unix sockets must stay under 107 bytes, so when ``home/ray`` is too long Ray is given
    ``/tmp/kl-ray-<hash of home>``, a symlink to it that lives while Ray runs (in stack.json).
  * Every socket binds 127.0.0.1. ``ray start`` rewrites ``--node-ip-address=127.0.0.1`` to the
    machine's routable address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode),
    and a client rewrites ``127.0.0.1:port`` the same way; so the head runs with it and ``env()``
    hands it to clients. It must be in the environment before ``import ray``.
  * Which processes belong to a service: each is spawned with ``start_new_session=True`` and the
    marker ``KIMI_LABEL_STACK=<stack id>/<service>`` in its environment. Its members are the
    processes of that session or carrying that marker (Ray's daemons and workers inherit both),
    so ``down`` stops exactly them, by PID, including workers started after ``up``. PIDs are
    stored with their start time, so a recycled PID is never mistaken for ours. ``ray stop`` is
    never used (it kills every Ray process of the user).
  * ``up`` is idempotent: live services are kept, dead ones are cleaned up and restarted (on their
    old ports when free), missing ones started; it never stops a running service. ``down`` is idempotent and keeps the data,
    credentials and logs. A lock file serialises concurrent ``up``/``down`` on one home.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.local_s3 import SeaweedError, SeaweedS3, pick_ports
from pipelines.procfs import alive, port_free, proc_stat

SERVICES = ("s3", "prefect", "ray")
BUCKET = "audio"
REGION = "us-east-1"
HOST = "127.0.0.1"
STATE_FILE = "stack.json"
PORTS_FILE = "ports.json"  # the ports `down` stopped; the next `up` takes them again when free
CREDENTIALS_FILE = "credentials.json"
RAY_TOKEN_FILE = "ray_auth_token"
LOCK_FILE = ".stack.lock"
MARKER_ENV = "KIMI_LABEL_STACK"
RAY_AUTH_MODE = "token"
RAY_LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Prefect, the Ray GCS and Ray's autoscaler metrics: clear of Ray's worker ports (10002-19999) and
# of SeaweedFS (20000-39999, gRPC at HTTP + 10000).
PORT_RANGE = (40000, 49999)
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store must fit in sun_path (107 bytes).
RAY_TEMP_DIR_MAX = 40
START_TIMEOUT_S = {"s3": 30.0, "prefect": 120.0, "ray": 90.0}
STOP_TIMEOUT_S = 10.0
CRASHED_STOP_TIMEOUT_S = 2.0  # remnants of a half-dead service (a raylet without its GCS) hang

# Children spawned by this process, kept so they are reaped (no zombies, no ResourceWarning) when
# `down` runs in the same process as `up`; a CLI caller simply exits and leaves them to init.
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(RuntimeError):
    """The local stack could not be started, or its state is unusable."""


# ---- processes, read from /proc --------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    """A process identified by PID and start time (clock ticks after boot), immune to PID reuse."""

    pid: int
    start: int


def _proc(pid: int) -> Proc | None:
    st = proc_stat(pid)
    return Proc(pid, st[2]) if st else None


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)


def is_alive(proc: Proc) -> bool:
    """Running (not a zombie) and still the same process."""
    _reap(proc.pid)
    return alive(proc.pid, proc.start)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop(groups: list[list[Proc]], timeout_s: float) -> None:
    """SIGTERM each group in turn, wait for it, SIGKILL what is left of it."""
    for group in groups:
        live = [p for p in group if is_alive(p)]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        if not _wait_gone(live, timeout_s):
            for p in live:
                if is_alive(p):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
            if not _wait_gone(live, 5.0):
                still = [p.pid for p in live if is_alive(p)]
                raise StackError(f"processes {still} survived SIGKILL")


def _wait_gone(procs: list[Proc], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(is_alive(p) for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- state ----------------------------------------------------------------------------------
@dataclass
class ServiceState:
    """One service of the stack, as recorded in stack.json.

    ``session``/``session_start``: the process we spawned (its PID is the session id of all its
    descendants). ``main``: the processes that must be alive for the service to count as running.
    ``pids``: every member seen at ``up`` (``down`` looks again for later ones, e.g. Ray workers).
    """

    name: str
    session: int
    session_start: int
    main: list[Proc]
    pids: list[Proc]
    ports: dict[str, int]
    endpoint: str
    log: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict) -> ServiceState:
        doc = dict(doc)
        doc["main"] = [Proc(**p) for p in doc["main"]]
        doc["pids"] = [Proc(**p) for p in doc["pids"]]
        return cls(**doc)

    def running(self) -> bool:
        return all(is_alive(p) for p in self.main)

    def members(self, stack_id: str) -> list[Proc]:
        """Live processes of this service: its session, its marker or its recorded PIDs."""
        marker = f"\0{MARKER_ENV}={stack_id}/{self.name}\0".encode()
        leader = proc_stat(self.session)
        # A dead session leader's PID can be reused only by a process that is not in our session,
        # unless it called setsid() itself: then it is the new leader, with another start time.
        session_ours = leader is None or leader[2] == self.session_start
        found = {p.pid: p for p in self.pids if is_alive(p)}
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (me, *found):
                continue
            pid = int(entry.name)
            st = proc_stat(pid)
            if st is None or st[0] in "ZXx":
                continue
            mine = session_ours and st[1] == self.session and st[2] >= self.session_start
            if not mine:
                try:
                    mine = marker in b"\0" + (entry / "environ").read_bytes()
                except OSError:
                    continue
            if mine:
                found[pid] = Proc(pid, st[2])
        return sorted(found.values(), key=lambda p: p.pid)


@dataclass
class StackState:
    """What ``up`` started; ``env()``/``storage_options()`` are what a client needs."""

    home: Path
    stack_id: str
    services: dict[str, ServiceState] = field(default_factory=dict)
    region: str = REGION
    ray_auth_mode: str = RAY_AUTH_MODE
    _credentials: dict = field(default_factory=dict, repr=False)

    # ---- persistence --------------------------------------------------------------------
    @classmethod
    def load(cls, home: str | os.PathLike) -> StackState | None:
        """The recorded state of ``home`` (whether or not its processes still run), or None."""
        home = _resolve(home)
        path = home / STATE_FILE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            state = cls(
                home=home,
                stack_id=doc["stack_id"],
                services={k: ServiceState.from_json(v) for k, v in doc["services"].items()},
                region=doc.get("region", REGION),
                ray_auth_mode=doc.get("ray_auth_mode", RAY_AUTH_MODE),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StackError(f"{path} is unreadable ({exc}); remove it and any leftover "
                             "processes by hand") from exc
        state._credentials = _read_credentials(home) or {}
        return state

    def save(self) -> None:
        doc = {
            "stack_id": self.stack_id,
            "home": str(self.home),
            "region": self.region,
            "ray_auth_mode": self.ray_auth_mode,
            "services": {k: asdict(v) for k, v in self.services.items()},
        }
        tmp = self.home / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.home / STATE_FILE)

    # ---- what clients need ----------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return self.services["s3"].endpoint

    def storage_options(self) -> dict:
        """s3fs keyword arguments for the stack's S3 (admin identity)."""
        return {
            "key": self._credentials["access_key"],
            "secret": self._credentials["secret_key"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def env(self) -> dict[str, str]:
        """Environment for a client process; apply it before ``import ray``."""
        env = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self._credentials["access_key"],
            "AWS_SECRET_ACCESS_KEY": self._credentials["secret_key"],
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = self.services["prefect"].endpoint
        if "ray" in self.services:
            env.update(_ray_env(self.home, self.ray_auth_mode))
            env["RAY_ADDRESS"] = self.services["ray"].endpoint
        return env


def _resolve(home: str | os.PathLike) -> Path:
    return Path(home).expanduser().resolve()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _read_credentials(home: Path) -> dict | None:
    path = home / CREDENTIALS_FILE
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return {"access_key": doc["s3"]["access_key"], "secret_key": doc["s3"]["secret_key"]}


def _ensure_secrets(home: Path) -> dict:
    """S3 credentials and the Ray token: generated on the first ``up``, reused afterwards."""
    creds = _read_credentials(home)
    if creds is None:
        creds = {"access_key": "AK" + secrets.token_hex(9).upper(),
                 "secret_key": secrets.token_urlsafe(30)}
        _write_private(home / CREDENTIALS_FILE, json.dumps({"s3": creds}, indent=2) + "\n")
    token = home / RAY_TOKEN_FILE
    if not token.exists() or not token.read_text().strip():
        _write_private(token, secrets.token_hex(32))  # Ray's own format: 256 bits, hex
    return creds


def _ray_env(home: Path, auth_mode: str) -> dict[str, str]:
    return {
        "RAY_AUTH_MODE": auth_mode,
        "RAY_AUTH_TOKEN_PATH": str(home / RAY_TOKEN_FILE),
        "RAY_USAGE_STATS_ENABLED": "0",
        **RAY_LOCAL_ONLY,
    }


@contextlib.contextmanager
def _locked(home: Path):
    with open(home / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- spawning -------------------------------------------------------------------------------
def _free_port(taken: set[int], prefer: int | None = None) -> int:
    """A free port in PORT_RANGE; ``prefer`` (the port before a restart) when it is free."""
    if prefer and prefer not in taken and port_free(prefer, HOST):
        taken.add(prefer)
        return prefer
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(*PORT_RANGE)
        if port in taken or not port_free(port, HOST):
            continue
        taken.add(port)
        return port
    raise StackError(f"no free port in {PORT_RANGE}")


def _script(name: str) -> str:
    for candidate in (Path(sysconfig.get_path("scripts")) / name,
                      Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"no '{name}' executable next to {sys.executable} or on PATH")
    return found


def _child_env(stack_id: str, service: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(extra)
    env[MARKER_ENV] = f"{stack_id}/{service}"
    return env


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return proc


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _StackSeaweed(SeaweedS3):
    """SeaweedS3 whose process carries the stack marker and can be released to run on its own."""

    def __init__(self, *args, marker: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._marker = marker

    def _child_env(self) -> dict[str, str]:
        env = super()._child_env()
        if self._marker:
            env[MARKER_ENV] = self._marker
        return env

    def release(self) -> subprocess.Popen:
        """Stop owning the started process: no stop at garbage collection or interpreter exit."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _CHILDREN[proc.pid] = proc
        return proc


def _start_s3(home: Path, stack_id: str, creds: dict, ports: dict[str, int] | None
              ) -> ServiceState:
    server = _StackSeaweed(
        home / "s3",
        buckets=(BUCKET,),
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        ports=ports,
        region=REGION,
        start_timeout_s=START_TIMEOUT_S["s3"],
        marker=f"{stack_id}/s3",
    )
    try:
        server.start()
    except SeaweedError as exc:
        raise StackError(f"S3 (SeaweedFS) did not start: {exc}") from exc
    proc = server.release()
    me = _proc(proc.pid)
    if me is None:
        raise StackError("SeaweedFS exited right after start-up")
    return ServiceState(
        name="s3", session=proc.pid, session_start=me.start, main=[me], pids=[me],
        ports=dict(server.ports), endpoint=server.endpoint_url, log=str(server.log_path),
        extra={"bucket": BUCKET, "data_dir": str(server.data_dir)},
    )


def _launch_prefect(home: Path, stack_id: str, taken: set[int],
                    prefer: dict[str, int]) -> ServiceState:
    """Start the Prefect server without waiting; `_wait_prefect` waits for /api/health."""
    port = _free_port(taken, prefer.get("api"))
    prefect_home = home / "prefect"
    prefect_home.mkdir(exist_ok=True)
    log = home / "prefect.log"
    env = _child_env(stack_id, "prefect", {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    cmd = [_script("prefect"), "server", "start", "--host", HOST, "--port", str(port),
           "--analytics-off", "--no-ui"]
    proc = _spawn(cmd, env, log, prefect_home)
    me = _proc(proc.pid) or Proc(proc.pid, -1)
    return ServiceState(
        name="prefect", session=proc.pid, session_start=me.start, main=[me], pids=[me],
        ports={"api": port}, endpoint=f"http://{HOST}:{port}/api", log=str(log),
        extra={"prefect_home": str(prefect_home)},
    )


def _wait_prefect(svc: ServiceState, stack_id: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S["prefect"]
    last = "no answer yet"
    while True:
        if not svc.running():
            raise StackError(f"the Prefect server exited during start-up; log tail "
                             f"({svc.log}):\n{_log_tail(Path(svc.log))}")
        ok, last = _probe_http(svc.endpoint + "/health")
        if ok:
            break
        if time.monotonic() > deadline:
            raise StackError(f"Prefect at {svc.endpoint} not healthy after "
                             f"{START_TIMEOUT_S['prefect']:.0f} s (last: {last}); log tail "
                             f"({svc.log}):\n{_log_tail(Path(svc.log))}")
        time.sleep(0.3)
    svc.pids = svc.members(stack_id)


def _ray_temp_dir(home: Path) -> Path:
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


def _start_ray(home: Path, stack_id: str, taken: set[int], prefer: dict[str, int]) -> ServiceState:
    gcs_port = _free_port(taken, prefer.get("gcs"))
    # The autoscaler's metrics port is otherwise a fixed 44217, shared by every Ray on the host.
    metrics_port = _free_port(taken, prefer.get("autoscaler_metrics"))
    temp_dir = _ray_temp_dir(home)
    log = home / "ray.log"
    env = _child_env(stack_id, "ray", {
        **_ray_env(home, RAY_AUTH_MODE),
        "AUTOSCALER_METRIC_PORT": str(metrics_port),
    })
    cmd = [_script("ray"), "start", "--head", f"--node-ip-address={HOST}", f"--port={gcs_port}",
           "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=false",
           f"--dashboard-host={HOST}", "--disable-usage-stats"]
    launcher = _spawn(cmd, env, log, home)  # forks the daemons into its session, then exits
    me = _proc(launcher.pid) or Proc(launcher.pid, -1)
    svc = ServiceState(
        name="ray", session=launcher.pid, session_start=me.start, main=[], pids=[],
        ports={"gcs": gcs_port, "autoscaler_metrics": metrics_port},
        endpoint=f"{HOST}:{gcs_port}", log=str(log), extra={"temp_dir": str(temp_dir)},
    )
    try:
        code = launcher.wait(timeout=START_TIMEOUT_S["ray"])
    except subprocess.TimeoutExpired:
        code = None
    _reap(launcher.pid)
    svc.pids = svc.members(stack_id)
    if code != 0:
        _stop_service(svc, stack_id)
        raise StackError(f"`ray start --head` {'timed out' if code is None else f'exit {code}'}; "
                         f"log tail ({log}):\n{_log_tail(log)}")
    by_name = {_comm(p.pid): p for p in svc.pids}
    svc.main = [by_name[n] for n in ("gcs_server", "raylet") if n in by_name]
    if len(svc.main) != 2 or not _port_open(HOST, gcs_port):
        _stop_service(svc, stack_id)
        raise StackError(f"Ray head did not come up (gcs_server/raylet missing or port {gcs_port} "
                         f"closed); log tail ({log}):\n{_log_tail(log)}")
    return svc


# ---- stopping -------------------------------------------------------------------------------
def _stop_service(svc: ServiceState, stack_id: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop every member of a service; True when something was running."""
    procs = svc.members(stack_id)
    if svc.name == "ray":
        # As `ray stop` orders it: the raylet first (agents fate-share with it), the GCS last.
        first = [p for p in procs if _comm(p.pid) == "raylet"]
        last = [p for p in procs if _comm(p.pid) == "gcs_server"]
        groups = [first, [p for p in procs if p not in first and p not in last], last]
    else:
        groups = [procs]
    _stop(groups, timeout_s)
    # A worker forked while we stopped the others: one more sweep.
    late = svc.members(stack_id)
    if late:
        _stop([late], timeout_s)
    _clean_leftovers(svc)
    return bool(procs)


def _clean_leftovers(svc: ServiceState) -> None:
    if svc.name == "s3":
        data_dir = Path(svc.extra["data_dir"])
        (data_dir / "weed.pid").unlink(missing_ok=True)
        leftover = SeaweedS3(data_dir)
        leftover.ports = dict(svc.ports)
        leftover._remove_grpc_sockets()  # weed leaves its gRPC unix sockets in /tmp
    elif svc.name == "ray":
        temp_dir = Path(svc.extra["temp_dir"])
        (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        if temp_dir.is_symlink():
            temp_dir.unlink()


# ---- probes ---------------------------------------------------------------------------------
def _port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _probe_http(url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read(200).decode(errors="replace").strip()
            return resp.status == 200, f"HTTP {resp.status} {body}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _probe_s3(state: StackState) -> tuple[bool, str]:
    """A signed HEAD of the bucket with the stack's credentials."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=state.endpoint_url,
        region_name=state.region,
        aws_access_key_id=state._credentials["access_key"],
        aws_secret_access_key=state._credentials["secret_key"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1},
                      s3={"addressing_style": "path"}),
    )
    try:
        client.head_bucket(Bucket=BUCKET)
        return True, f"signed HEAD s3://{BUCKET} ok"
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with its reason
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


# ---- the API --------------------------------------------------------------------------------
def stack_up(
    home: str | os.PathLike,
    prefect: bool = False,
    ray: bool = False,
    s3_port: int | None = None,
) -> StackState:
    """Start S3 (always), Prefect and/or Ray unless already running; return the whole state."""
    home = _resolve(home)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    with _locked(home):
        creds = _ensure_secrets(home)
        state = StackState.load(home)
        if state is None:
            state = StackState(home=home, stack_id=secrets.token_hex(8))
        state._credentials = creds
        # a restarted service keeps its ports if free, also after `down`: endpoints a user
        # exported (AWS_ENDPOINT_URL, PREFECT_API_URL) stay right
        previous = _last_ports(home)
        for name, svc in list(state.services.items()):
            if not svc.running():  # crashed or killed: clear its remnants, start it afresh
                _stop_service(svc, state.stack_id, timeout_s=CRASHED_STOP_TIMEOUT_S)
                previous[name] = svc.ports
                del state.services[name]
        s3 = state.services.get("s3")
        if s3 is not None and s3_port and s3.ports["s3"] != s3_port:
            raise StackError(f"S3 already runs on port {s3.ports['s3']}, not {s3_port}; "
                             "run `stack down` first")
        wanted = [n for n, on in (("s3", True), ("prefect", prefect), ("ray", ray))
                  if on and n not in state.services]
        if not wanted:
            if previous:  # dead services were dropped and are not wanted again
                state.save()
            return state

        taken = {p for svc in state.services.values() for p in svc.ports.values()}
        started: list[ServiceState] = []
        try:
            if "prefect" in wanted:  # the slowest (~12 s): boots while the others start
                started.append(_launch_prefect(home, state.stack_id, taken,
                                               previous.get("prefect", {})))
            if "s3" in wanted:
                ports = {"s3": s3_port} if s3_port else None
                old = previous.get("s3", {})
                if not s3_port and old.get("s3"):
                    # every port as before when all are free, else at least the endpoint's
                    for keep in (old, {"s3": old["s3"]}):
                        with contextlib.suppress(SeaweedError, ValueError):  # busy (TIME_WAIT)
                            ports = pick_ports(HOST, keep)
                            break
                started.append(_start_s3(home, state.stack_id, creds, ports))
            if "ray" in wanted:
                started.append(_start_ray(home, state.stack_id, taken, previous.get("ray", {})))
            for svc in started:
                if svc.name == "prefect":
                    _wait_prefect(svc, state.stack_id)
        except BaseException:
            for svc in started:
                with contextlib.suppress(Exception):
                    _stop_service(svc, state.stack_id)
            if state.services:
                state.save()  # the services that were already running, without the dead ones
            else:
                (home / STATE_FILE).unlink(missing_ok=True)
            raise
        for svc in started:
            state.services[svc.name] = svc
        state.services = {n: state.services[n] for n in SERVICES if n in state.services}
        state.save()
        return state


def stack_down(home: str | os.PathLike) -> list[str]:
    """Stop every process ``up`` started (by PID, Ray's daemons and workers included) and remove
    stack.json. Returns the services that had running processes; [] when nothing ran."""
    home = _resolve(home)
    if not (home / STATE_FILE).exists():
        return []
    with _locked(home):
        state = StackState.load(home)
        if state is None:
            return []
        names = list(state.services)
        with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
            results = list(pool.map(lambda n: _stop_service(state.services[n], state.stack_id),
                                    names))
        (home / PORTS_FILE).write_text(json.dumps({n: state.services[n].ports for n in names}))
        (home / STATE_FILE).unlink(missing_ok=True)
        return [n for n, was_running in zip(names, results) if was_running]


def _last_ports(home: Path) -> dict[str, dict[str, int]]:
    """The ports of the services the last `down` stopped ({} when unknown or unreadable)."""
    try:
        doc = json.loads((home / PORTS_FILE).read_text())
        return {name: {k: int(v) for k, v in ports.items()} for name, ports in doc.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def stack_status(home: str | os.PathLike) -> dict:
    """Per service: running (main PIDs alive), healthy (a real probe), endpoint, live PIDs.
    JSON-serialisable; never contains a secret."""
    home = _resolve(home)
    state = StackState.load(home)
    report: dict = {"home": str(home), "up": False, "services": {}}
    for name in SERVICES:
        svc = state.services.get(name) if state else None
        if svc is None:
            report["services"][name] = {"running": False, "healthy": False, "endpoint": None}
            continue
        running = svc.running()
        entry = {
            "running": running,
            "healthy": False,
            "endpoint": svc.endpoint,
            "ports": svc.ports,
            "pids": [p.pid for p in svc.members(state.stack_id)] if running else [],
            "log": svc.log,
        }
        if running:
            if name == "s3":
                entry["healthy"], entry["detail"] = _probe_s3(state)
            elif name == "prefect":
                entry["healthy"], entry["detail"] = _probe_http(svc.endpoint + "/health")
            else:
                entry["healthy"] = _port_open(HOST, svc.ports["gcs"])
                entry["detail"] = f"GCS {svc.endpoint} " + (
                    "accepts connections" if entry["healthy"] else "refuses connections")
        else:
            entry["detail"] = "not running (stale state; `stack down` or `stack up` cleans it)"
        report["services"][name] = entry
    report["up"] = bool(state and state.services) and all(
        report["services"][n]["running"] for n in state.services)
    return report
