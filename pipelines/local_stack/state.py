"""The stack's home folder: what ``up`` started (stack.json), its secrets, and what a client needs.

Contract:
  * Everything lives in ``home`` (mode 0700)::

        credentials.json   S3 access key/secret, generated once, reused by every ``up`` (0600)
        ray_auth_token     Ray's token (RAY_AUTH_MODE=token), generated once (0600)
        stack.json         per service: PIDs, ports, endpoints, logs; never a secret
        ports.json         the ports the last ``down`` stopped; the next ``up`` takes them again
        s3/                SeaweedFS data, weed.log and its identities file s3.json (0600)
        prefect/           PREFECT_HOME of the server (SQLite database); prefect.log beside it
        ray/               Ray's --temp-dir (session logs); ray.log is the output of ``ray start``

  * A process is recorded as its PID and start time (`pipelines.processes`), never by PID alone.
  * ``env()`` is the whole environment of a client (S3 endpoint and credentials, Prefect's API,
    Ray's address, its Jobs API and token); ``stack.json`` and ``repr()`` never hold a secret.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.errors import StackError
from pipelines.local_stack.supervision import is_alive, members
from pipelines.processes import ProcessIdentity

SERVICES = ("s3", "prefect", "ray")
BUCKET = "audio"
REGION = "us-east-1"
STATE_FILE = "stack.json"
PORTS_FILE = "ports.json"
CREDENTIALS_FILE = "credentials.json"
RAY_TOKEN_FILE = "ray_auth_token"
RAY_AUTH_MODE = "token"
# `ray start` and Ray clients rewrite 127.0.0.1 to the machine's routable address unless Ray
# runs in single-node mode (`ray_head`).
RAY_LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def resolve_home(home: str | os.PathLike) -> Path:
    return Path(home).expanduser().resolve()


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner may read, also when the file existed before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def read_credentials(home: Path) -> dict | None:
    path = home / CREDENTIALS_FILE
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return {"access_key": doc["s3"]["access_key"], "secret_key": doc["s3"]["secret_key"]}


def ensure_secrets(home: Path) -> dict:
    """S3 credentials and the Ray token: generated on the first ``up``, reused afterwards."""
    creds = read_credentials(home)
    if creds is None:
        creds = {"access_key": "AK" + secrets.token_hex(9).upper(),
                 "secret_key": secrets.token_urlsafe(30)}
        write_private(home / CREDENTIALS_FILE, json.dumps({"s3": creds}, indent=2) + "\n")
    token = home / RAY_TOKEN_FILE
    if not token.exists() or not token.read_text().strip():
        write_private(token, secrets.token_hex(32))  # Ray's own format: 256 bits, hex
    return creds


def ray_client_env(home: Path, auth_mode: str = RAY_AUTH_MODE) -> dict[str, str]:
    """What every process of the stack's Ray, and every client of it, needs in its environment
    (before ``import ray``): the token, no usage stats, single-node addresses."""
    return {
        "RAY_AUTH_MODE": auth_mode,
        "RAY_AUTH_TOKEN_PATH": str(home / RAY_TOKEN_FILE),
        "RAY_USAGE_STATS_ENABLED": "0",
        **RAY_LOCAL_ONLY,
    }


def last_ports(home: Path) -> dict[str, dict[str, int]]:
    """The ports of the services the last `down` stopped ({} when unknown or unreadable)."""
    try:
        doc = json.loads((home / PORTS_FILE).read_text())
        return {name: {k: int(v) for k, v in ports.items()} for name, ports in doc.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def record_ports(home: Path, ports: dict[str, dict[str, int]]) -> None:
    (home / PORTS_FILE).write_text(json.dumps(ports))


@dataclass
class ServiceState:
    """One service of the stack, as recorded in stack.json.

    ``session``/``session_start``: the process we spawned (its PID is the session id of all its
    descendants). ``main``: the processes that must be alive for the service to count as running.
    ``pids``: every member seen at ``up`` (``down`` looks again for later ones, e.g. Ray workers).
    ``urls``: what a user opens or a client is given, by name (an API, a UI, the dashboard).
    """

    name: str
    session: int
    session_start: float
    main: list[ProcessIdentity]
    pids: list[ProcessIdentity]
    ports: dict[str, int]
    endpoint: str
    log: str
    urls: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict) -> ServiceState:
        doc = dict(doc)
        doc["main"] = [ProcessIdentity(**p) for p in doc["main"]]
        doc["pids"] = [ProcessIdentity(**p) for p in doc["pids"]]
        return cls(**doc)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["main"] = [p._asdict() for p in self.main]
        doc["pids"] = [p._asdict() for p in self.pids]
        return doc

    def running(self) -> bool:
        return all(is_alive(p) for p in self.main)

    def members(self, stack_id: str) -> list[ProcessIdentity]:
        """Live processes of this service: its session, its marker or its recorded PIDs."""
        return members(f"{stack_id}/{self.name}",
                       ProcessIdentity(self.session, self.session_start), self.pids)


@dataclass
class StackState:
    """What ``up`` started; ``env()``/``storage_options()`` are what a client needs."""

    home: Path
    stack_id: str
    services: dict[str, ServiceState] = field(default_factory=dict)
    region: str = REGION
    ray_auth_mode: str = RAY_AUTH_MODE
    credentials: dict = field(default_factory=dict, repr=False)

    # ---- persistence --------------------------------------------------------------------
    @classmethod
    def load(cls, home: str | os.PathLike) -> StackState | None:
        """The recorded state of ``home`` (whether or not its processes still run), or None."""
        home = resolve_home(home)
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
        state.credentials = read_credentials(home) or {}
        return state

    def save(self) -> None:
        doc = {
            "stack_id": self.stack_id,
            "home": str(self.home),
            "region": self.region,
            "ray_auth_mode": self.ray_auth_mode,
            "services": {k: v.to_json() for k, v in self.services.items()},
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
            "key": self.credentials["access_key"],
            "secret": self.credentials["secret_key"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def env(self) -> dict[str, str]:
        """Environment for a client process; apply it before ``import ray``."""
        env = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.credentials["access_key"],
            "AWS_SECRET_ACCESS_KEY": self.credentials["secret_key"],
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = self.services["prefect"].endpoint
        if "ray" in self.services:
            env.update(ray_client_env(self.home, self.ray_auth_mode))
            env["RAY_ADDRESS"] = self.services["ray"].endpoint
            dashboard = self.services["ray"].urls.get("dashboard")
            if dashboard:  # where `ray job submit|list|logs` go (its Jobs API)
                env["RAY_API_SERVER_ADDRESS"] = dashboard
        return env
