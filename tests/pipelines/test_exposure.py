"""Exposure: every service the project starts listens on loopback only and is gone after stop;
no object key or URI makes a writer put a file outside its output prefix.

Sockets are read the way `ss -ltnup` does: /proc/net/{tcp,tcp6,udp,udp6} give (address, state,
inode); /proc/<pid>/fd maps each process to its socket inodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.local_stack.supervision import MARKER_ENV
from tests.processes import alive, identify, marked

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"


# -- /proc sockets ---------------------------------------------------------------------------

def _address(hex_addr: str) -> tuple[str, int]:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    raw = b"".join(raw[i: i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port_hex, 16)


def socket_table() -> dict[str, tuple[str, str, int]]:
    """inode -> (proto, ip, port) of every listening TCP and every unconnected UDP socket."""
    table = {}
    for proto, state in (("tcp", TCP_LISTEN), ("tcp6", TCP_LISTEN), ("udp", UDP_UNCONNECTED),
                         ("udp6", UDP_UNCONNECTED)):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == state and cols[9] != "0":
                table[cols[9]] = (proto, *_address(cols[1]))
    return table


def socket_inodes(pid: int) -> set[str]:
    found = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE).group(1))
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def bound_sockets(pids: set[int]) -> dict[int, list[tuple[str, str, int]]]:
    """pid -> its listening TCP / bound UDP sockets."""
    table = socket_table()
    return {pid: sorted(table[i] for i in socket_inodes(pid) if i in table) for pid in pids}


def exposed(sockets: dict[int, list[tuple[str, str, int]]]) -> dict[int, list]:
    return {pid: [s for s in socks if s[1] not in LOOPBACK]
            for pid, socks in sockets.items() if any(s[1] not in LOOPBACK for s in socks)}


def procs(pids: set[int]) -> list[tuple[int, float]]:
    return [me for pid in pids if (me := identify(pid)) is not None]


# -- the services ----------------------------------------------------------------------------

@pytest.mark.slow
def test_stack_services_and_their_children_listen_on_loopback_only():
    from pipelines.local_stack import stack_down, stack_up

    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="kl-exp-"))  # Ray sockets: < 107 bytes
    try:
        state = stack_up(home, prefect=True, ray=True)
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("AWS_", "RAY_", "PREFECT_"))}, **state.env()}
        # Ray workers are started on demand: run tasks so they exist and open their servers
        client = textwrap.dedent("""
            import os, ray
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
            square = ray.remote(lambda x: x * x)
            print("sum", sum(ray.get([square.remote(i) for i in range(8)])))
            ray.shutdown()
        """)
        run = subprocess.run([sys.executable, "-c", client], cwd=home, env=env, timeout=120,
                             capture_output=True, text=True, check=False)
        assert run.returncode == 0 and "sum 140" in run.stdout, run.stderr[-3000:]

        roots = {p.pid for svc in state.services.values() for p in svc.members(state.stack_id)}
        members = descendants(roots)
        sockets = bound_sockets(members)
        assert exposed(sockets) == {}
        tcp_ports = {port for socks in sockets.values() for proto, _, port in socks
                     if proto.startswith("tcp")}
        # not vacuous: every service's main port is among the listeners found, and every port
        # the Ray head was given (GCS, dashboard, its agents, metrics, Ray Client)
        for svc in state.services.values():
            main = {"s3": "s3", "prefect": "api", "ray": "gcs"}[svc.name]
            assert svc.ports[main] in tcp_ports, (svc.name, svc.ports)
        assert set(state.services["ray"].ports.values()) <= tcp_ports
        assert len(tcp_ports) >= 10  # weed's HTTP+gRPC pairs, Ray's GCS/raylet/workers
        recorded = procs(members)
    finally:
        stopped = stack_down(home)
        shutil.rmtree(home, ignore_errors=True)
    assert sorted(stopped) == ["prefect", "ray", "s3"]
    assert [p for p in recorded if alive(*p)] == []
    # nothing of the stack runs any more, so nothing of it listens: every process it started
    # (Ray's workers included) carries its marker. (Its ports themselves may have gone to other
    # tests' processes since.)
    assert marked(MARKER_ENV, f"{state.stack_id}/") == []


def test_seaweed_launcher_binds_loopback_only(tmp_path):
    from pipelines.local_stack import SeaweedS3

    with SeaweedS3(tmp_path / "weed", buckets=["audio"]) as s3:
        members = descendants({s3.pid})
        sockets = bound_sockets(members)
        recorded = procs(members)
        ports = {port for socks in sockets.values() for _, _, port in socks}
        assert exposed(sockets) == {}
        assert s3.ports["s3"] in ports and len(ports) >= 8
    assert [p for p in recorded if alive(*p)] == []


JOB_RAY = textwrap.dedent("""
    import sys
    from pipelines.job.placement import local_object_store_bytes
    from pipelines.job.ray_cluster import init_ray
    from pipelines.spec import JobSpec
    import ray
    init_ray(None, local_object_store_bytes(JobSpec(input="/in", output="/out", model="/m")),
             sys.argv[1])
    square = ray.remote(lambda x: x * x)
    print("sum", sum(ray.get([square.remote(i) for i in range(8)])), flush=True)
    sys.stdin.readline()  # the test reads the sockets now
    ray.shutdown()
""")


@pytest.mark.slow
def test_the_jobs_own_local_ray_binds_loopback_only():
    temp = tempfile.mkdtemp(prefix="kl-ray-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", JOB_RAY, temp], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    recorded: list[tuple[int, float]] = []
    try:
        assert proc.stdout.readline().strip() == "sum 140"
        members = descendants({proc.pid})
        recorded = procs(members)
        sockets = bound_sockets(members)
        assert exposed(sockets) == {}
        assert sum(len(s) for s in sockets.values()) >= 3  # GCS, raylet, workers
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        from tests.processes import stop

        left = [p for p in recorded if alive(*p)]
        stop(left)  # only if the job's shutdown failed; then the assertion below says so
        shutil.rmtree(temp, ignore_errors=True)
    assert left == []


# -- keys that must not become paths -----------------------------------------------------------

HOSTILE_KEYS = [
    "../../../../etc/passwd", "/etc/passwd", "..", ".", "", "a/../../b", "a/./../../x",
    "\u2215etc\u2215passwd", "\uff0e\uff0e/\uff0e\uff0e/x", "\uff0e\uff0e\u2215x",
    "nul\0byte.wav", "back\\..\\..\\slash.wav", "..\\..\\x", "x" * 300 + ".wav",
    "/".join(["deep"] * 200) + ".wav", "\u202egnp.wav", "line\nbreak.wav", "~/x.wav",
    "%2e%2e/%2e%2e/x.wav", "C:\\Windows\\x.wav", "a//b///c.wav", " .wav",
]


def _uris(key: str) -> list[str]:
    return [f"s3://audio/in/{key}", f"/data/in/{key}", f"file:///data/in/{key}", key]


def _under(root: Path, written: list[str]) -> None:
    real = root.resolve()
    for path in written:
        assert Path(path).resolve().is_relative_to(real), path
    for path in root.parent.rglob("*"):
        assert path.resolve().is_relative_to(real) or path.resolve() == real, path


def _write_shard(out: Path, uris: list[str]) -> list[str]:
    """The pipeline's real writer stage over rows with these source URIs -> paths written."""
    import pyarrow as pa

    from pipelines.stages import WriteStage

    files = [{"source_uri": u, "status": "error", "etag": None, "run_id": "r",
              "error": {"kind": "undecodable", "message": "x"}} for u in uris]
    batch = pa.table({"source_uri": uris, "etag": [None] * len(uris),
                      "piece": [0] * len(uris), "pieces": [1] * len(uris),
                      "files_json": pa.array([json.dumps(f) for f in files], pa.large_string()),
                      "segments_json": pa.array(["[]"] * len(uris), pa.large_string()),
                      "decode_s": [0.0] * len(uris), "frontend_s": [0.0] * len(uris),
                      "label_s": [0.0] * len(uris)})
    WriteStage(str(out), None, ["asr"], {"language": "auto", "question": None}, False)(batch)
    return [str(p) for p in out.rglob("*") if p.is_file()]


def _write_subtitles(out: Path, uris: list[str], input_uri: str) -> list[str]:
    """transcribe-archive's real subtitle naming and writer -> paths written."""
    import fsspec

    from pipelines.subtitles import input_prefix, subtitle_names, write_file_subtitles

    fs = fsspec.filesystem("file")
    names = subtitle_names(uris, input_prefix(input_uri, False, False))
    written = []
    for uri in uris:
        written += write_file_subtitles(fs, str(out), names[uri], [
            {"segment_index": 0, "start_s": 0.0, "end_s": 1.0, "status": "ok",
             "transcript": "hello"}])
    return written


def test_shard_and_subtitle_paths_of_hostile_keys_stay_under_the_output(tmp_path):
    from pipelines.storage import shard_name

    uris = [u for key in HOSTILE_KEYS for u in _uris(key)]
    for uri in uris:
        assert re.fullmatch(r"part-[0-9a-f]{20}\.parquet", shard_name([(uri, None)])), uri
    out = tmp_path / "box" / "out"
    written = _write_shard(out, uris)
    assert sorted(Path(p).relative_to(out).parent.as_posix() for p in written) == [
        "files", "segments"]
    _under(out, written)

    for input_uri in ("s3://audio/in", "/data/in"):
        subs = tmp_path / "subs" / input_uri.replace("/", "_") / "out"
        written = _write_subtitles(subs, [u for u in uris if "://" in u or u.startswith("/")]
                                   if input_uri.startswith("s3") else uris, input_uri)
        assert written and all(Path(p).suffix in (".srt", ".vtt") for p in written)
        _under(subs, written)


KEY_ALPHABET = st.sampled_from(list("ab./\\\0 ~%:") + ["..", "\u2215", "\uff0e", "\u202e",
                                                        "\u00e9", "\U0001f600", "\ufeff"])


@settings(max_examples=60, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(keys=st.lists(st.lists(KEY_ALPHABET, min_size=0, max_size=40).map("".join)
                     | st.text(min_size=0, max_size=300), min_size=1, max_size=4))
def test_any_key_stays_under_the_output_prefix(tmp_path_factory, keys):
    base = tmp_path_factory.mktemp("keys")
    uris = sorted({u for key in keys for u in _uris(key)[:2]})
    out = base / "box" / "out"
    _under(out, _write_shard(out, uris))
    subs = base / "subs" / "out"
    _under(subs, _write_subtitles(subs, uris, "s3://audio/in"))
