"""The embedded local stack with real processes: SeaweedFS, a Prefect server and a Ray head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.local_stack import (
    MARKER_ENV,
    StackState,
    listening_addresses,
    stack_down,
    stack_status,
    stack_up,
)
from pipelines.errors import StackError
from pipelines.processes import ProcessIdentity, is_running, port_free

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


@pytest.fixture
def home():
    # Short: Ray's unix socket paths under <home>/ray must stay below 107 bytes.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kl-stack-"))
    try:
        yield path
    finally:
        stack_down(path)
        shutil.rmtree(path, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RAY_", "PREFECT_", MARKER_ENV))}


def _running(pid: int, start: float) -> bool:
    return is_running(ProcessIdentity(pid, start))


def _pids(state: StackState, service: str) -> list[int]:
    return [p.pid for p in state.services[service].pids]


def _all_members(state: StackState) -> list:
    return [p for svc in state.services.values() for p in svc.members(state.stack_id)]


def _assert_loopback_only(state: StackState) -> None:
    listening = {p.pid: listening_addresses(p.pid) for p in _all_members(state)}
    exposed = {pid: addrs for pid, addrs in listening.items()
               if any(ip not in LOOPBACK for ip, _ in addrs)}
    assert exposed == {}
    ports = {port for addrs in listening.values() for _, port in addrs}
    for svc in state.services.values():
        for main_port in {"s3": ["s3"], "prefect": ["api"], "ray": ["gcs", "dashboard"]}[svc.name]:
            assert svc.ports[main_port] in ports


def _secrets(home: Path) -> list[str]:
    creds = json.loads((home / "credentials.json").read_text())["s3"]
    return [creds["secret_key"], creds["access_key"], (home / "ray_auth_token").read_text()]


def _processes_of(stack_id: str, *needles: str) -> list[tuple[int, str]]:
    """Live processes carrying the stack's marker or naming one of ``needles`` on their command
    line."""
    marker = f"{MARKER_ENV}={stack_id}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in "ZXx":
            continue
        if any(n in cmdline for n in needles) or marker in environ:
            found.append((int(entry.name), cmdline[:120]))
    return found


def test_s3_stack_up_status_down(home, monkeypatch):
    # `up` from a separate process, as the CLI does: the server must outlive it.
    script = "import sys; from pipelines.local_stack import stack_up; stack_up(sys.argv[1])"
    up = subprocess.run([sys.executable, "-c", script, str(home)], check=False, cwd=ROOT,
                        env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr[-3000:]
    state = StackState.load(home)
    assert state is not None and list(state.services) == ["s3"]
    s3 = state.services["s3"]
    assert all(_running(p.pid, p.start) for p in s3.pids)

    status = stack_status(home)
    assert status["up"] is True
    assert status["services"]["s3"]["running"] and status["services"]["s3"]["healthy"]
    assert status["services"]["prefect"]["running"] is False
    assert status["services"]["ray"]["running"] is False
    _assert_loopback_only(state)

    # Secrets: only in 0600 files, never in stack.json, the status or the output of `up`.
    secret_values = _secrets(home)
    for name in ("credentials.json", "ray_auth_token"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    public = (home / "stack.json").read_text() + json.dumps(status) + up.stdout + up.stderr
    assert not [s for s in secret_values if s in public]
    assert not [s for s in secret_values if s in repr(state)]

    # S3 works with the client environment, exactly as a botocore/boto3 user would pick it up.
    env = state.env()
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint and env["AWS_ENDPOINT_URL"].startswith(
        "http://127.0.0.1:")
    assert "PREFECT_API_URL" not in env and "RAY_ADDRESS" not in env
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = botocore.session.get_session().create_client("s3")
    client.put_object(Bucket="audio", Key="stack-test/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="audio", Key="stack-test/hello.txt")["Body"].read() == b"hello"

    import s3fs

    fs = s3fs.S3FileSystem(**state.storage_options())
    assert fs.cat("audio/stack-test/hello.txt") == b"hello"

    # Anonymous access is refused: plain HTTP and an unsigned client.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{s3.endpoint}/audio/stack-test/hello.txt", timeout=5)
    assert refused.value.code == 403
    anon = botocore.session.get_session().create_client(
        "s3", config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as denied:
        anon.put_object(Bucket="audio", Key="stack-test/anon.txt", Body=b"x")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    # A second `up` keeps the running server and its credentials.
    again = stack_up(home)
    assert _pids(again, "s3") == _pids(state, "s3")
    assert again.services["s3"].endpoint == s3.endpoint
    assert again.env()["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]

    # A crashed server is noticed, then restarted on its data and credentials by `up` (on its old
    # port unless that is still held, e.g. by TIME_WAIT connections).
    os.kill(s3.main[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(s3.main[0].pid, s3.main[0].start) and time.monotonic() < deadline:
        time.sleep(0.05)
    crashed = stack_status(home)
    assert crashed["up"] is False and crashed["services"]["s3"]["running"] is False
    restarted = stack_up(home)
    assert _pids(restarted, "s3") != _pids(state, "s3")
    assert s3fs.S3FileSystem(**restarted.storage_options()).cat(
        "audio/stack-test/hello.txt") == b"hello"

    assert stack_down(home) == ["s3"]
    for proc in s3.pids + restarted.services["s3"].pids:
        assert not _running(proc.pid, proc.start)
    assert not (home / "stack.json").exists()
    after = stack_status(home)
    assert after["up"] is False and after["services"]["s3"]["running"] is False
    assert stack_down(home) == []
    assert (home / "credentials.json").exists()  # kept for the next `up`

    # The next `up` serves on the same endpoint (when its port is free): what a user exported
    # (AWS_ENDPOINT_URL) stays right. `kimi-label stack up` and `status` print the exports,
    # never the secret; `--s3-port` picks the port.
    said = []

    def kimi_label_stack(*args):
        done = subprocess.run([sys.executable, "-m", "flows.console", "stack", *args,
                               "--home", str(home)], cwd=ROOT, env=_clean_env(),
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        secrets = [v for v in secret_values if v != env["AWS_ACCESS_KEY_ID"]]  # the key id is
        assert not [v for v in secrets if v in done.stdout + done.stderr]  # printed, by design
        said.append(done.stderr)
        return done.stdout

    endpoint = restarted.services["s3"].endpoint
    assert f"export AWS_ENDPOINT_URL={endpoint}\n" in kimi_label_stack("up"), said[-1]
    assert StackState.load(home).services["s3"].ports == restarted.services["s3"].ports  # all
    assert s3fs.S3FileSystem(**StackState.load(home).storage_options()).cat(
        "audio/stack-test/hello.txt") == b"hello"
    status = kimi_label_stack("status")
    assert f"export AWS_ENDPOINT_URL={endpoint}\n" in status and "credentials.json" in status
    assert kimi_label_stack("down").startswith("stopped: s3")
    port = next(p for p in range(int(endpoint.rsplit(":", 1)[1]) + 1, 40000)
                if port_free(p) and port_free(p + 10000))  # weed's gRPC: HTTP + 10000
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}\n" in kimi_label_stack(
        "up", "--s3-port", str(port))
    moved = subprocess.run([sys.executable, "-m", "flows.console", "stack", "up", "--s3-port",
                            str(port + 1), "--home", str(home)], cwd=ROOT, env=_clean_env(),
                           capture_output=True, text=True, timeout=120, check=False)
    assert moved.returncode == 2 and moved.stderr == (  # one line, not a traceback
        f"error: stack up: S3 already runs on port {port}, not {port + 1}; run `stack down` "
        "first\n")
    assert kimi_label_stack("down").startswith("stopped: s3")
    # its last port taken meanwhile: another one, and a warning that the endpoint moved
    with socket.socket() as taker:
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its TIME_WAITs
        taker.bind(("127.0.0.1", port))
        taker.listen()
        up = kimi_label_stack("up")
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}\n" not in up
    assert f"S3 cannot serve on its last port {port} (port(s) [{port}] on 127.0.0.1 are in " \
           "use" in said[-1] and "needs the new one" in said[-1], said[-1]
    assert kimi_label_stack("down").startswith("stopped: s3")


def _dot_ray() -> list | None:
    dot_ray = Path.home() / ".ray"
    return sorted((p.name, p.stat().st_mtime) for p in dot_ray.iterdir()) \
        if dot_ray.is_dir() else None


@pytest.fixture(scope="module")
def full_home():
    """The home of the module's stack with Prefect and Ray (each start costs about 20 s), and
    ~/.ray as it was before."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kl-stack-"))
    try:
        yield path, _dot_ray()
    finally:
        stack_down(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def full_stack(full_home) -> StackState:
    """The module's stack with Prefect and Ray: started by the first test that asks for it,
    kept for the next (`up` is idempotent), started again after a test stopped it."""
    return stack_up(full_home[0], prefect=True, ray=True)


def test_joining_the_stacks_ray_needs_only_its_token(full_stack):
    """`--ray-address` at the stack's Ray: without the token the job's check refuses in seconds,
    naming what to export; with it, but without the stack's single-node variable, the job
    still joins (a loopback address stays one instead of becoming this machine's routable
    address, where the head never answers); a port that is not a GCS is named as such."""
    env = full_stack.env()
    probe = textwrap.dedent("""
        import sys, time
        from pipelines.errors import JobError
        from pipelines.job.ray_cluster import check_ray_address, init_ray
        address = sys.argv[1]
        start = time.monotonic()
        try:
            check_ray_address(address)
        except JobError as exc:
            print("refused", round(time.monotonic() - start), exc)
            raise SystemExit(0)
        import ray
        init_ray(address, 0)
        print("joined", ray.cluster_resources().get("CPU"))
        ray.shutdown()
    """)

    def run(address: str, extra: dict[str, str]) -> str:
        proc = subprocess.run([sys.executable, "-c", probe, address], cwd=ROOT, check=False,
                              env={**_clean_env(), **extra}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    address = env["RAY_ADDRESS"]
    no_token = run(address, {})
    assert no_token.startswith("refused") and int(no_token.split()[1]) <= 5
    assert "refused this client's authentication token (none sent, or not the cluster's): " \
        "export RAY_AUTH_MODE" in no_token
    token_only = {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    assert run(address, token_only).startswith("joined")
    s3_port = env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    not_gcs = run(f"127.0.0.1:{s3_port}", token_only)
    assert not_gcs.startswith("refused")
    assert "accepts connections but did not answer as a Ray cluster's GCS" in not_gcs


FOLLOWER = textwrap.dedent("""
    import sys, time
    from pipelines.job.submit import follow, job_client

    client = job_client(sys.argv[1])
    job = client.submit_job(entrypoint="python -c 'import time; print(4321, flush=True); "
                                       "time.sleep(300)'")

    def interrupt(line):
        if line == "4321":  # as a flow run's cancellation interrupts its task
            raise KeyboardInterrupt

    try:
        follow(client, job, on_log=interrupt, poll_s=0.2)
    except KeyboardInterrupt:
        print("interrupted", client.get_job_status(job))
    deadline = time.monotonic() + 30
    while client.get_job_status(job) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.2)
    print("final", client.get_job_status(job))
""")


def test_a_job_on_the_stacks_ray_is_stopped_when_its_follower_is_interrupted(full_stack):
    """The stack's Ray head serves the Jobs API (with its token): a job submitted there runs,
    and a follower that is interrupted, as a cancelled flow run's is, stops it."""
    env = full_stack.env()
    token_only = {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    proc = subprocess.run([sys.executable, "-c", FOLLOWER,
                           full_stack.services["ray"].urls["dashboard"]], cwd=ROOT, check=False,
                          env={**_clean_env(), **token_only}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] in ("interrupted RUNNING", "interrupted STOPPED"), proc.stdout
    assert lines[-1] == "final STOPPED", proc.stdout
    assert "Task was destroyed" not in proc.stderr  # the log stream was closed, not dropped


def test_full_stack_prefect_and_ray(full_home, full_stack, capsys):
    """Last of the module's tests on its stack: it stops it."""
    from flows.console.app import main
    from pipelines.local_stack.ray_head import machine_cpus

    state, home = full_stack, full_stack.home
    assert list(state.services) == ["s3", "prefect", "ray"]
    status = stack_status(home)
    assert status["up"] is True
    for name in ("s3", "prefect", "ray"):
        assert status["services"][name]["healthy"], status["services"][name].get("detail")
    _assert_loopback_only(state)

    # What a user opens, on loopback: the Prefect UI and the Ray dashboard. The head's CPUs
    # are this machine's.
    ui, dashboard = (status["services"]["prefect"]["urls"]["ui"],
                     status["services"]["ray"]["urls"]["dashboard"])
    for url in (ui, dashboard):
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read(3000).lower()
    assert status["services"]["ray"]["num_cpus"] == machine_cpus()
    with pytest.raises(StackError, match=f"Ray already runs with {machine_cpus()} CPUs, not "
                                         f"{machine_cpus() + 1}; run `stack down` first"):
        stack_up(home, ray=True, ray_cpus=machine_cpus() + 1)  # (the override, refused here)
    # `stack status --json`: the status, and nothing else, on stdout; without it, the URLs
    assert main(["stack", "status", "--json", "--home", str(home)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["services"]["ray"]["urls"]["dashboard"] == dashboard
    assert shown["services"]["prefect"]["pids"] == status["services"]["prefect"]["pids"]
    assert main(["stack", "status", "--home", str(home)]) == 0
    said = capsys.readouterr().out
    assert f"  UI         {ui}\n" in said and f"  dashboard  {dashboard}\n" in said
    assert f"export PREFECT_API_URL={state.env()['PREFECT_API_URL']}\n" in said

    env = state.env()
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=5) as resp:
        assert resp.status == 200 and resp.read().strip() == b"true"
    assert env["RAY_ADDRESS"].startswith("127.0.0.1:")
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_API_SERVER_ADDRESS"] == dashboard  # for `ray job submit|list|logs`
    assert not [s for s in _secrets(home) if s in (home / "stack.json").read_text()]

    client = textwrap.dedent("""
        import os, ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        @ray.remote
        def double(x):
            return 2 * x
        print("result", sum(ray.get([double.remote(i) for i in range(4)])))
        print("cpus", ray.cluster_resources()["CPU"])
        ray.shutdown()
    """)
    run = subprocess.run([sys.executable, "-c", client], check=False, cwd=home,
                         env={**_clean_env(), **env}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "result 12" in run.stdout and f"cpus {float(machine_cpus())}" in run.stdout

    recorded = _all_members(state)  # includes the Ray workers the task started
    ray_temp = state.services["ray"].extra["temp_dir"]
    assert sorted(stack_down(home)) == ["prefect", "ray", "s3"]
    assert not [p.pid for p in recorded if _running(p.pid, p.start)]
    assert _processes_of(state.stack_id, str(home), ray_temp) == []
    assert stack_status(home)["up"] is False

    assert _dot_ray() == full_home[1]
