"""The Ray Data job on a real two-node Ray cluster on one machine: a head and a second node, each
with one logical CPU, on 127.0.0.1. The job runs in its own driver process that joins the cluster
through RAY_ADDRESS (as a Prefect worker or a RayJob driver does) and must spread its work over
both nodes and write one files row per input, to S3 (SeaweedFS) with the endpoint and
credentials in the driver's AWS_* environment only: the cluster's nodes started without them.

Every process this test starts is found by its session or a marker in its environment and stopped
by PID; `ray stop` is never used (it would kill every Ray process of the user).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.local_stack import listening_addresses
from pipelines.local_stack.ports import free_port
from pipelines.local_stack.supervision import members
from pipelines.processes import ProcessIdentity, identify
from tests import goldens
from tests.processes import alive as _alive
from tests.processes import comm as _comm
from tests.processes import marked
from tests.processes import stop as _stop
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(goldens.CHECKPOINT)
MARKER_ENV = "KIMI_LABEL_TWO_NODE_TEST"
HOST = "127.0.0.1"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}
CLIPS = 8
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 150


# ---- processes ------------------------------------------------------------------------------
def _marked_by(prefix: str) -> list[tuple[int, float]]:
    return marked(MARKER_ENV, prefix)


def _members(marker: str, session: int | None = None,
             session_start: float = 0) -> list[tuple[int, float]]:
    """(pid, start) of live processes carrying ``MARKER_ENV=marker`` in their environment or
    belonging to ``session`` (the PID of the process we spawned with a new session)."""
    leader = None if session is None else ProcessIdentity(session, session_start)
    return members(marker, leader, marker_env=MARKER_ENV)


# ---- the cluster ------------------------------------------------------------------------------
@dataclass
class RayNode:
    name: str
    marker: str
    temp_dir: Path
    log: Path
    ports: dict[str, int]
    session: int = 0
    session_start: float = 0
    seen: list[tuple[int, float]] = field(default_factory=list)

    def members(self) -> list[tuple[int, float]]:
        found = dict(p for p in self.seen if _alive(*p))
        found.update(_members(self.marker, self.session, self.session_start))
        return sorted(found.items())

    def stop(self) -> None:
        # As `ray stop` orders it: the raylet first (agents fate-share with it), the GCS last.
        procs = self.members()
        raylet = [p for p in procs if _comm(p[0]) == "raylet"]
        gcs = [p for p in procs if _comm(p[0]) == "gcs_server"]
        _stop(raylet)
        _stop([p for p in procs if p not in raylet and p not in gcs])
        _stop(gcs)
        late = self.members()  # a worker forked while we stopped the others
        if late:
            _stop(late)


@dataclass
class Cluster:
    base: Path
    run_id: str
    env: dict[str, str]
    address: str = ""
    nodes: list[RayNode] = field(default_factory=list)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "PREFECT_", "AWS_", MARKER_ENV))}


# `ray start` for a node that joins a cluster refuses to run in single-node mode
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and outside it rewrites --node-ip-address=127.0.0.1 and the
# head's 127.0.0.1 address to the machine's routable address, so the node would listen there. This
# launcher lifts the refusal and keeps 127.0.0.1, in the launcher process only: the daemons it
# starts run with the environment's single-node mode, so they too stay on loopback.
RAY_START = textwrap.dedent("""
    import sys
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main

    ray_constants.ENABLE_RAY_CLUSTER = True
    services.resolve_ip_for_localhost = lambda host: host
    sys.argv[0] = "ray"
    sys.exit(main())
""")


def _start_node(cluster: Cluster, name: str, head: bool, taken: set[int]) -> RayNode:
    gcs, nm, om, agent, agent_grpc, metrics, runtime_env, autoscaler = (
        free_port(taken) for _ in range(8))
    temp_dir = cluster.base / name  # short: Ray's unix sockets must fit in 107 bytes
    temp_dir.mkdir(mode=0o700)
    node = RayNode(name=name, marker=f"{cluster.run_id}/{name}", temp_dir=temp_dir,
                   log=cluster.base / f"{name}.log",
                   ports={"node_manager": nm, "object_manager": om})
    cmd = [sys.executable, "-c", RAY_START, "start", f"--node-ip-address={HOST}",
           "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--object-store-memory=300000000", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"]
    if head:
        node.ports["gcs"] = gcs
        cmd += ["--head", f"--port={gcs}", "--include-dashboard=false",
                f"--dashboard-host={HOST}"]
    else:
        cmd += [f"--address={cluster.address}", '--resources={"worker2": 1}']
    env = {**_clean_env(), **cluster.env, MARKER_ENV: node.marker,
           "AUTOSCALER_METRIC_PORT": str(autoscaler)}
    with open(node.log, "ab") as out:
        launcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=cluster.base,
                                    start_new_session=True)
    node.session = launcher.pid
    leader = identify(launcher.pid)
    node.session_start = leader.start if leader else 0
    cluster.nodes.append(node)  # recorded before waiting: a failed start is still cleaned up
    try:
        code = launcher.wait(timeout=START_TIMEOUT_S)  # forks the daemons, then exits
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
        code = None
    node.seen = _members(node.marker, node.session, node.session_start)
    names = {_comm(pid) for pid, _ in node.seen}
    wanted = {"raylet", "gcs_server"} if head else {"raylet"}
    assert code == 0 and wanted <= names, (
        f"`ray start` for {name}: exit {code}, processes {sorted(names)}; log:\n"
        + node.log.read_text(errors="replace")[-3000:])
    if head:
        cluster.address = f"{HOST}:{gcs}"
    return node


@pytest.fixture
def cluster():
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="kl2n-"))
    os.chmod(base, 0o700)
    token = base / "ray_auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    # Token auth for every process of the cluster and its clients; single-node mode keeps
    # --node-ip-address=127.0.0.1 (and clients' 127.0.0.1:port) from being rewritten to the
    # machine's routable address. All of it must be in the environment before `import ray`.
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    state = Cluster(base=base, run_id=uuid.uuid4().hex[:12], env=env)
    try:
        taken: set[int] = set()
        _start_node(state, "head", head=True, taken=taken)
        _start_node(state, "w2", head=False, taken=taken)
        state.env = {**env, "RAY_ADDRESS": state.address}
        yield state
    finally:
        for node in reversed(state.nodes):  # the second node first, the head (GCS) last
            node.stop()
        _stop(marked(MARKER_ENV, state.run_id + "/"))  # anything else carrying our marker (a driver)
        shutil.rmtree(base, ignore_errors=True)


# ---- the job -----------------------------------------------------------------------------------
DRIVER = textwrap.dedent("""
    import json, os, sys

    import ray

    import pipelines.stages as stages
    from pipelines.job import JobSpec, run_job

    RECORD = sys.argv[2]


    def note(stage, event, rows=0):  # one line per batch (or actor start), appended atomically
        line = json.dumps({"stage": stage, "event": event, "rows": rows, "pid": os.getpid(),
                           "node": ray.get_runtime_context().get_node_id()}) + "\\n"
        fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


    # Defined in __main__, so Ray ships them to the workers by value.
    class DecodeStage(stages.DecodeStage):
        def __call__(self, batch):
            out = super().__call__(batch)
            note("decode", "batch", batch.num_rows)
            return out


    class FrontendStage(stages.FrontendStage):
        def setup(self):  # once per actor, where it runs
            super().setup()
            note("frontend", "start")

        def __call__(self, batch):
            out = super().__call__(batch)
            note("frontend", "batch", batch.num_rows)
            return out


    class LabelStage(stages.LabelStage):
        def setup(self):  # once per actor, where it runs
            super().setup()
            note("label", "start")

        def __call__(self, batch):
            out = super().__call__(batch)
            note("label", "batch", batch.num_rows)
            return out


    class WriteStage(stages.WriteStage):
        def __call__(self, batch):
            out = super().__call__(batch)
            note("write", "batch", batch.num_rows)
            return out


    stages.DecodeStage, stages.FrontendStage = DecodeStage, FrontendStage
    stages.LabelStage, stages.WriteStage = LabelStage, WriteStage
    report = run_job(JobSpec(**json.loads(sys.argv[1])))  # joins the cluster: RAY_ADDRESS

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"],
              "resources": n["Resources"]} for n in ray.nodes()]
    ray.shutdown()
    print("RESULT " + json.dumps({"nodes": nodes, "processed": report["processed"],
                                  "status": report["status"], "run_id": report["run_id"]}))
""")


def _clip(i: int) -> bytes:
    sr = 16000
    t = np.arange(int((1.0 + 0.25 * (i % 4)) * sr)) / sr
    wave = (0.3 * np.sin(2 * np.pi * (180 + 45 * i) * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_job_joins_a_two_node_cluster_and_both_nodes_work(cluster, seaweed, s3_prefix,
                                                         tmp_path):
    from pipelines.storage import resolve

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(CLIPS):
        (inputs / f"clip{i:02d}.wav").write_bytes(_clip(i))
    output = f"{s3_prefix}/out"
    record = tmp_path / "record.jsonl"
    # Two logical CPUs in all, one per node. The job's plan read (`read_parquet`: a ListFiles
    # and a ReadFiles task) asks for a whole CPU per task and cannot be given less through the
    # JobSpec; the actor pools start with the job and Ray Data spreads them one per node, so any
    # CPU share for them leaves no node with a whole free CPU and the read never runs (the 2-CPU
    # deadlock). So the four actors reserve no CPU; the read, four decode tasks of a quarter CPU
    # (one clip per batch) and the writers share the two CPUs.
    spec = {
        "input": str(inputs), "output": str(output), "model": MODEL,
        "tasks": ["asr", "emotion"], "max_new_tokens": 4, "no_progress_timeout_s": 90,
        "stages": {"decode": {"batch_size": 1, "num_cpus": 0.25, "concurrency": 4},
                   "frontend": {"batch_size": 1, "num_cpus": 0, "concurrency": 2},
                   "label": {"batch_size": 2, "num_cpus": 0, "concurrency": 2},
                   "write": {"batch_size": 1, "num_cpus": 0.25, "concurrency": 2}},
    }
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver_marker = f"{cluster.run_id}/driver"
    env = {**_clean_env(), **cluster.env, **seaweed.env, MARKER_ENV: driver_marker,
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "driver.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), json.dumps(spec), str(record)],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        driver_procs = _members(driver_marker, proc.pid)
        _stop(driver_procs)
        proc.poll()
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    assert code == 0, f"driver exit {code} after {elapsed:.0f} s; log tail:\n{text[-5000:]}"
    result = json.loads(next(line for line in text.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])

    # The cluster: two live nodes, the second with its custom resource, both on loopback.
    nodes = {n["id"]: n for n in result["nodes"] if n["alive"]}
    assert len(nodes) == 2, result["nodes"]
    assert all(n["ip"] == HOST for n in nodes.values())
    worker2 = [nid for nid, n in nodes.items() if n["resources"].get("worker2") == 1]
    assert len(worker2) == 1
    head = next(nid for nid in nodes if nid not in worker2)

    # Both nodes did work: per-batch node ids recorded inside the stages.
    events = [json.loads(line) for line in record.read_text().splitlines()]
    by_stage: dict[str, set[str]] = defaultdict(set)
    rows: dict[str, int] = defaultdict(int)
    for e in events:
        assert e["node"] in nodes, e
        if e["event"] == "batch":
            by_stage[e["stage"]].add(e["node"])
            rows[e["stage"]] += e["rows"]
    worked = set().union(*by_stage.values())
    assert worked == {head, worker2[0]}, dict(by_stage)
    assert rows["decode"] == rows["frontend"] == rows["label"] == rows["write"] == CLIPS, rows
    actor_nodes = {(e["stage"], e["node"]) for e in events if e["event"] == "start"}
    print(f"two-node job: {elapsed:.1f} s; nodes per stage "
          f"{ {s: sorted('head' if n == head else 'w2' for n in ns) for s, ns in by_stage.items()} }"
          f"; actors {sorted((s, 'head' if n == head else 'w2') for s, n in actor_nodes)}")

    # The output is complete: one files row per input, all ok, one run.
    assert result["processed"] == CLIPS and result["status"] == {"ok": CLIPS}
    fs, root = resolve(output, seaweed.storage_options)

    def rows(table: str, columns=None) -> list[dict]:
        return [r for p in sorted(fs.find(f"{root}/{table}")) if p.endswith(".parquet")
                for r in pq.read_table(fs.open(p, "rb"), columns=columns).to_pylist()]

    files = rows("files")
    assert sorted(Path(r["source_uri"]).name for r in files) == sorted(
        f"clip{i:02d}.wav" for i in range(CLIPS))
    assert {r["status"] for r in files} == {"ok"}
    assert {r["run_id"] for r in files} == {result["run_id"]}
    segments = rows("segments", ["source_uri", "emotion"])
    assert len(segments) == CLIPS and all(s["emotion"] for s in segments)

    # The credentials reached the workers in memory only: no log or file of the cluster or the
    # driver holds the secret.
    secret = seaweed.env["AWS_SECRET_ACCESS_KEY"].encode()
    leaked = [str(f) for f in [*cluster.base.rglob("*"), *tmp_path.rglob("*")]
              if f.is_file() and not f.is_symlink() and secret in f.read_bytes()]
    assert leaked == []

    # Every socket of both nodes is on loopback.
    exposed = {}
    for node in cluster.nodes:
        for pid, _ in node.members():
            with contextlib.suppress(OSError):
                bad = [a for a in listening_addresses(pid) if a[0] not in LOOPBACK]
                if bad:
                    exposed[(node.name, _comm(pid))] = bad
    assert exposed == {}

    # Stopping by PID leaves nothing of ours behind: no process with our marker or session.
    everything = [p for node in cluster.nodes for p in node.members()]
    assert any(_comm(pid) == "raylet" for pid, _ in everything)
    for node in reversed(cluster.nodes):
        node.stop()
    assert not [p for p in everything if _alive(*p)]
    assert _marked_by(cluster.run_id + "/") == []
