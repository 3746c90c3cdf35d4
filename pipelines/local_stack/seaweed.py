"""A real, local S3 endpoint: SeaweedFS ``weed mini`` bound to loopback, with credentials enforced.

Used by the tests and by the local stack; the pipeline itself only ever sees an endpoint URL and
credentials (``storage_options`` for s3fs, ``env`` for anything that reads the AWS variables).

Contract (ports, binding and credentials: `seaweed_config`):
  * The data folder holds the data, ``weed.log`` (stdout/stderr), glog files under ``logs/``, the
    filer/S3 unix sockets and ``weed.pid``. The secret is written only to ``s3.json``.
  * ``stop()`` signals exactly the PID we started (SIGTERM, then SIGKILL) and is idempotent.
    ``start()`` after ``stop()`` is a restart: the same data folder, ports and credentials, so
    clients keep their endpoint (used to simulate an object-store outage).
  * The server stops when its ``SeaweedS3`` is garbage collected or the interpreter exits,
    unless ``release()`` handed it over to run on its own (the local stack does).
"""

from __future__ import annotations

import os
import subprocess
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

from pipelines.local_stack.ports import HOST, PortClaims, listening_addresses
from pipelines.local_stack.probes import s3_client
from pipelines.local_stack.seaweed_config import (
    ADMIN_ACTIONS,
    S3Identity,
    SeaweedError,
    find_weed_binary,
    mini_arguments,
    pick_ports,
    remove_grpc_sockets,
    write_identities,
)
from pipelines.local_stack.supervision import log_tail, spawn_detached, stop_child

# Variables that change how weed itself behaves (AWS_ACCESS_KEY_ID creates an extra admin user).
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
_READY_PROBE_KEY = ".seaweed-s3-ready-probe"
PID_FILE = "weed.pid"


def _is_running_weed(pid: int) -> bool:
    """True when ``pid`` is alive and is a weed process (not a recycled PID)."""
    try:
        return "weed" in " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:  # a zombie included
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: assume the worst


def _valid_bucket_name(name: str) -> bool:
    return 3 <= len(name) <= 63 and all(c.islower() or c.isdigit() or c in ".-" for c in name)


class SeaweedS3:
    """A SeaweedFS ``weed mini`` S3 server for one data folder.

    >>> with SeaweedS3(tmp_dir, buckets=["audio"]) as s3:
    ...     fs = s3fs.S3FileSystem(**s3.storage_options)

    ``ports`` may fix any of ``master, volume, filer, s3, admin``; the rest are chosen free.
    ``access_key``/``secret_key`` default to random values. ``extra_identities`` adds further
    users (e.g. a read-only one), reachable via ``storage_options_for(name)``. ``extra_env`` is
    added to weed's environment (the local stack's marker).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        buckets: Iterable[str] = ("audio",),
        access_key: str | None = None,
        secret_key: str | None = None,
        extra_identities: Iterable[S3Identity] = (),
        ports: Mapping[str, int] | None = None,
        region: str = "us-east-1",
        weed_binary: str | os.PathLike | None = None,
        start_timeout_s: float = 90.0,  # on two busy cores its S3 gateway took over 30 s to
        # accept writes to a bucket it already listed
        stop_timeout_s: float = 10.0,
        extra_env: Mapping[str, str] | None = None,
    ):
        self.host = HOST
        self.data_dir = Path(data_dir).resolve()
        self.buckets = tuple(buckets)
        if not self.buckets:
            raise ValueError("at least one bucket is needed")
        for b in self.buckets:
            if not _valid_bucket_name(b):
                raise ValueError(f"invalid bucket name {b!r}")
        admin = S3Identity.generate("admin")
        self.admin = S3Identity(
            "admin", access_key or admin.access_key, secret_key or admin.secret_key, ADMIN_ACTIONS
        )
        self.identities = {"admin": self.admin}
        for ident in extra_identities:
            if ident.name in self.identities:
                raise ValueError(f"duplicate identity name {ident.name!r}")
            self.identities[ident.name] = ident
        self.region = region
        self._fixed_ports = dict(ports or {})
        self.ports: dict[str, int] = {}
        self._claims = PortClaims()  # held across a restart: nobody else picks our ports meanwhile
        self._weed = Path(weed_binary) if weed_binary else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen | None = None
        self._finalizer = None

    # ---- paths ---------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / PID_FILE

    @property
    def config_path(self) -> Path:
        return self.data_dir / "s3.json"

    # ---- what clients need ---------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise SeaweedError("SeaweedS3 is not started")
        return f"http://{self.host}:{self.ports['s3']}"

    def storage_options_for(self, identity: str = "admin") -> dict:
        ident = self.identities[identity]
        return {
            "key": ident.access_key,
            "secret": ident.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @property
    def storage_options(self) -> dict:
        """s3fs keyword arguments for the admin identity."""
        return self.storage_options_for("admin")

    def env_for(self, identity: str = "admin") -> dict[str, str]:
        ident = self.identities[identity]
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ident.access_key,
            "AWS_SECRET_ACCESS_KEY": ident.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables for the admin identity (s3fs, pyarrow ``from_uri``, Ray Data)."""
        return self.env_for("admin")

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.pid else "stopped"
        where = self.endpoint_url if "s3" in self.ports else "no endpoint"
        return f"SeaweedS3({where}, {state}, data_dir={str(self.data_dir)!r})"

    # ---- lifecycle -----------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> SeaweedS3:
        if self.pid is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_running()
        weed = self._weed or find_weed_binary()
        # a restart keeps the endpoint: the ports of the previous start, unless fixed otherwise
        self.ports = pick_ports(self.host, {**self.ports, **self._fixed_ports}, self._claims)
        write_identities(self.config_path, self.identities.values())
        (self.data_dir / "logs").mkdir(exist_ok=True)
        cmd = [str(weed), f"-logdir={self.data_dir / 'logs'}", "mini",
               *mini_arguments(self.data_dir, self.host, self.ports, self.buckets,
                               self.config_path)]
        self._proc = spawn_detached(cmd, self._child_env(), self.log_path, self.data_dir)
        self.pid_path.write_text(f"{self._proc.pid}\n")
        # Interpreter exit stops the server even if nobody called stop().
        self._finalizer = weakref.finalize(self, stop_child, self._proc, self.stop_timeout_s)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc = self._detach()  # the ports stay claimed: start() again is a restart on them
        if proc is None:
            return
        stop_child(proc, self.stop_timeout_s)
        if self.pid_path.exists() and self.pid_path.read_text().strip() == str(proc.pid):
            self.pid_path.unlink()
        remove_grpc_sockets(self.ports)

    def release(self) -> subprocess.Popen | None:
        """Stop owning the started server, which then runs on: no stop at garbage collection or
        interpreter exit, and its ports no longer claimed (it holds them itself). Returns its
        process (None when none was started)."""
        self._claims.release()
        return self._detach()

    def _detach(self) -> subprocess.Popen | None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return proc

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines,
                        hide=[ident.secret_key for ident in self.identities.values()])

    # ---- internals -----------------------------------------------------------------------
    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        env.update(self._extra_env)
        return env

    def _refuse_if_running(self) -> None:
        if not self.pid_path.exists():
            return
        try:
            old = int(self.pid_path.read_text().strip())
        except ValueError:
            old = None
        if old and _is_running_weed(old):
            raise SeaweedError(
                f"{self.pid_path} names a live process ({old}); another SeaweedS3 uses this data dir"
            )
        self.pid_path.unlink()

    def _exited_error(self) -> SeaweedError:
        code = None if self._proc is None else self._proc.returncode
        return SeaweedError(f"weed mini exited with code {code} during start-up; log tail "
                            f"({self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        """Until a signed HEAD of every bucket and a probe PUT/DELETE succeed on our port."""
        client = s3_client(self.endpoint_url, self.region, self.admin.access_key,
                           self.admin.secret_key, connect_timeout_s=1)
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    raise self._exited_error()
                try:
                    for bucket in self.buckets:
                        client.head_bucket(Bucket=bucket)
                    client.put_object(Bucket=self.buckets[0], Key=_READY_PROBE_KEY, Body=b"ok")
                    client.delete_object(Bucket=self.buckets[0], Key=_READY_PROBE_KEY)
                    break
                except Exception as e:  # noqa: BLE001 - refused, 404 before the bucket, 5xx
                    last = f"{type(e).__name__}: {e}"
                if time.monotonic() > deadline:
                    raise SeaweedError(
                        f"SeaweedFS at {self.endpoint_url} not usable after "
                        f"{self.start_timeout_s:.0f} s (last: {last}); log tail "
                        f"({self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.1)
        finally:
            client.close()
        self._check_port_is_ours()

    def _check_port_is_ours(self) -> None:
        """mini quietly moves to the next port when one is taken: make sure it is ours (where
        the system shows us weed's sockets)."""
        try:
            mine = {port for _, port in listening_addresses(self._proc.pid)}
        except PermissionError:
            return
        if self.ports["s3"] not in mine:
            raise SeaweedError(
                f"port {self.ports['s3']} answers but is not held by weed pid "
                f"{self._proc.pid} (it listens on {sorted(mine)})"
            )
