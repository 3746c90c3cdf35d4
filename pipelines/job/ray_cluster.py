"""The Ray connection of a job: address forms, tokens, loopback, starting or joining Ray. The
only module that uses Ray's private APIs (`ray._private`, `ray._raylet`); when Ray moves them,
this is what changes.

  * `check_ray_address(address)`: a cluster to join must answer before anything is allocated:
    a GCS `host:port` (asked for its session, so a missing token or a port that is not a GCS
    is refused in seconds); `auto` and `local` are left to Ray; a URL is refused, a `ray://`
    (Ray Client) one too: a job goes to a remote cluster through the Ray Jobs API
    (`pipelines.job.submit`).
  * `init_ray(spec)`: join the cluster, or start a Ray of the job's own on this machine, bound
    to loopback, with an object store sized by the job's in-flight budget.
  * `driver_log_level()`: the level of Ray's driver-side lines, following the console's.
  * cluster facts for placement: `cluster_gpus`, `alive_nodes`, `smallest_node_cpus`,
    `local_gpus`, `object_store_minimum`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from pipelines.errors import Interrupted, JobError


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A cluster to join must answer: `ray.init` would otherwise retry an address nobody listens
    on for many minutes. A GCS `host:port` is also asked for its session (`probe_gcs`); "auto"
    and "local" are left to Ray; a `ray://` (Ray Client) address is refused: Ray's docs warn
    that Ray Client may not work as expected for ML workloads such as this one."""
    if not address or address in ("auto", "local"):
        return
    if address.startswith("ray://"):
        raise JobError(f"ray address {address!r}: Ray Client is not supported; submit the job "
                       "to the cluster through its Ray Jobs API instead (the "
                       "label-corpus-on-ray flow, or `ray job submit`, see infra/DEPLOY.md), "
                       "or give the head's GCS host:port from a machine of the cluster")
    if "://" in address:
        raise JobError(f"ray address {address!r}: expected the head's GCS host:port (port 6379 "
                       "by default) or auto, not a URL (http://...:8265 is the dashboard: "
                       "submit to it with the label-corpus-on-ray flow)")
    _reach(address, address, timeout_s,
           "is it running, and is the address its head's host:port?")
    probe_gcs(address, timeout_s)


def _reach(address: str, host_port: str, timeout_s: float, hint: str) -> None:
    """`host_port` (of `address`, as given) accepts a TCP connection, else a JobError."""
    import socket

    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise JobError(f"ray address {address!r}: expected host:port (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise JobError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                       f"{hint}") from None


def probe_gcs(address: str, timeout_s: float) -> None:
    """Ask the cluster's GCS for its session, with this process's Ray settings: a cluster that
    wants a token this client lacks, or a port that is not a GCS, is refused here in seconds
    (`ray.init` retried either for minutes, then failed as a bare `ConnectionError`)."""
    import threading

    try:
        from ray._raylet import GcsClient
    except ImportError:  # Ray moved its client: leave the check to ray.init
        return
    outcome: dict[str, BaseException | bool] = {}

    def ask() -> None:
        try:
            GcsClient(address=address).internal_kv_get(b"session_name", namespace=b"session",
                                                       timeout=timeout_s)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below, whatever Ray raised
            outcome["error"] = exc

    # a port that is not a GCS keeps Ray's client waiting about 40 s: wait in a thread
    thread = threading.Thread(target=ask, name="gcs-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 3)
    error = outcome.get("error")
    if outcome.get("ok"):
        return
    if error is None:
        raise JobError(f"{address} accepts connections but did not answer as a Ray cluster's "
                       f"GCS within {timeout_s + 3:g} s; is it the head's GCS port (6379 by "
                       "default), and is the head busy?")
    if type(error).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(error):
        raise JobError(
            f"the Ray cluster at {address} refused this client's authentication token (none "
            "sent, or not the cluster's): export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH, a file holding it); for the local stack, `kimi-label stack "
            "status` prints them")
    raise JobError(f"cannot talk to the Ray cluster at {address}: {error}")



def is_loopback(address: str) -> bool:
    """Whether a Ray `host:port` address names this machine's loopback interface."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def loopback_ray():
    """Around a local `ray.init`: single-node mode, as the stack's Ray. Otherwise Ray rewrites
    127.0.0.1 to the routable address and its gRPC servers listen on every interface
    (tests/test_exposure.py). The env var reaches the daemons and workers `ray.init` starts;
    the driver read it when ray was imported, hence the constant. Both are restored after (an
    explicit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 is left alone)."""
    from ray._private import ray_constants

    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    if saved_env is None or saved_env == "0":
        os.environ[key] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(key, None)



def init_ray(address: str | None, object_store_bytes: int,
             temp_dir: str | None = None) -> bool:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start a Ray of the job's own here
    with an object store of `object_store_bytes`; True when this call started or joined Ray
    (the caller shuts it down), False when Ray was running already."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        with python_sigterm_kept():
            if address:  # join a running cluster ("auto" on a head or RayJob driver pod)
                # a loopback address stays one: Ray's client would otherwise rewrite it to
                # this machine's routable address, where a loopback-only head never answers
                with loopback_ray() if is_loopback(address) else contextlib.nullcontext():
                    ray.init(address=address, log_to_driver=False,
                             logging_level=driver_log_level())
            else:
                with loopback_ray():
                    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                             num_cpus=max(os.cpu_count() or 1, 2), _temp_dir=temp_dir,
                             object_store_memory=object_store_bytes,
                             log_to_driver=False, logging_level=driver_log_level())
    except BaseException as exc:  # interrupted half way (Ctrl-C, SIGTERM): stop what it started
        ray.shutdown()
        if isinstance(exc, SystemExit) and exc.code in (signal.SIGTERM, signal.SIGINT):
            # Ray's handler's exit: said as such (Prefect took a bare SystemExit for a crash)
            raise Interrupted(exc.code) from None
        raise
    return True


def driver_log_level() -> int:
    """The level of Ray's log lines in this (the driver's) process: the level set on the
    `pipelines` logger (`kimi-label --log-level`), but not below INFO (Ray's DEBUG lines are for
    its developers); Ray's own INFO when none is set. `ray.init` sets it on the `ray` logger,
    and `pipelines.job.dataset` on Ray Data's console handler; the session's log files under
    Ray's temp dir keep their own levels."""
    level = logging.getLogger("pipelines").level
    return max(level, logging.INFO) if level else logging.INFO


@contextlib.contextmanager
def python_sigterm_kept():
    """Around `ray.init`: a SIGTERM handler this process set in Python (the command line's,
    which ends a run in one line) is put back afterwards; Ray's driver installs its own. And
    the driver's core worker installs no C++ failure-signal handler: that one (absl's) also
    takes SIGTERM, and a SIGTERM arriving while `ray.init` ran aborted the process with a
    stack dump (SIGABRT) instead of ending the run in one line. The daemons keep theirs; the
    driver's own crashes are still reported by Python (a fatal error and its traceback)."""
    import threading

    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read by the core worker's start
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def local_gpus() -> int:
    """GPUs a local `ray.init` will see (Ray's own detection: CUDA_VISIBLE_DEVICES, else NVML)."""
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as nv

        visible = nv.get_current_process_visible_accelerator_ids()
        return len(visible) if visible is not None else nv.get_current_node_num_accelerators()
    except Exception:  # no NVML, or Ray moved it: size the store for CPUs
        return 0



def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def smallest_node_cpus() -> float:
    return min((n["Resources"].get("CPU", 0) for n in alive_nodes()), default=1)


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def object_store_minimum() -> int:
    """The smallest object store Ray accepts."""
    from ray._private.ray_constants import OBJECT_STORE_MINIMUM_MEMORY_BYTES

    return OBJECT_STORE_MINIMUM_MEMORY_BYTES
