"""The storage layer against a real SeaweedFS (no mocks), plus local folders."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.local_stack import SeaweedError, SeaweedS3, listening_addresses, pick_ports
from pipelines.local_stack import ports as layout
from pipelines.storage import (
    InputInfo,
    ObjectInfo,
    ObjectVanishedError,
    StorageError,
    check_output,
    fetch,
    fetched,
    list_objects,
    open_input,
    read_manifest,
    StorageConfig,
    redact_uri,
    resolve,
)
from pipelines.storage.uri import redact
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401

MIXED = {
    "a.wav": b"a",
    "B.FLAC": b"b",
    "notes.txt": b"n",
    "x.wav.txt": b"x",
    "noext": b"-",
    "sub/c.Mp3": b"c",
    "sub/e.opus": b"e",
    "sub/img.png": b"i",
    "sub/deep/d.ogg": b"d",
    "subway.wav": b"s",
}
MIXED_AUDIO = {"a.wav", "B.FLAC", "sub/c.Mp3", "sub/e.opus", "sub/deep/d.ogg", "subway.wav"}


def _fs(seaweed, identity="admin"):  # noqa: F811
    fs, _ = resolve("s3://audio", seaweed.storage_options_for(identity))
    return fs


def _put(seaweed, prefix: str, files: dict[str, bytes]) -> None:  # noqa: F811
    _fs(seaweed).pipe({f"{prefix.removeprefix('s3://')}/{k}": v for k, v in files.items()})


def _names(infos, prefix: str) -> set[str]:
    return {i.uri.removeprefix(prefix + "/") for i in infos}


def _no_secrets(seaweed, text: str) -> None:  # noqa: F811
    for ident in seaweed.identities.values():
        assert ident.secret_key not in text


# -- the server ------------------------------------------------------------------------------

def test_server_listens_on_loopback_only(seaweed):  # noqa: F811
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line.split()[3] for line in ss.splitlines() if f"pid={seaweed.pid}," in line]
    assert ours, ss
    assert all(addr.startswith("127.0.0.1:") for addr in ours), ours
    proc = listening_addresses(seaweed.pid)
    assert sorted(ours) == sorted(f"{ip}:{port}" for ip, port in proc)
    ports = {port for _, port in proc}
    assert seaweed.ports["s3"] in ports
    assert not any(10002 <= p <= 19999 for p in ports)  # Ray's worker port range
    low, high = layout.ephemeral_range()  # no outgoing connection takes one of ours
    assert not [p for p in ports if low <= p <= high], sorted(ports)


def test_start_stop_by_pid(tmp_path):
    server = SeaweedS3(tmp_path / "s3", buckets=["one", "two"], secret_key="Sup3r-secret-value")
    with server:
        pid = server.pid
        assert (tmp_path / "s3" / "weed.pid").read_text().strip() == str(pid)
        assert {i.uri for i in list_objects("s3://two", None, server.storage_options)} == set()
        with pytest.raises(SeaweedError, match="live process"):
            SeaweedS3(tmp_path / "s3").start()
        assert "Sup3r-secret-value" not in repr(server)
        assert server.env["AWS_ENDPOINT_URL"] == server.endpoint_url
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "s3" / "weed.pid").exists()
    server.stop()  # idempotent
    # stopped, it still claims its ports for a restart: another server may not take them
    with pytest.raises(SeaweedError, match="claimed by another process"):
        SeaweedS3(tmp_path / "other", ports={"s3": server.ports["s3"]}).start()
    assert not (tmp_path / "other" / "weed.pid").exists()  # refused before anything started
    assert "Sup3r-secret-value" not in (tmp_path / "s3" / "weed.log").read_text()
    assert oct((tmp_path / "s3" / "s3.json").stat().st_mode & 0o777) == "0o600"


def test_chosen_ports_avoid_the_ephemeral_range_and_each_others_claims(tmp_path, monkeypatch):
    """An outgoing connection may take an ephemeral port between our check and the bind (a
    restarted store died of it): chosen ports avoid the kernel's range, whatever it is."""
    low, high = layout.ephemeral_range()
    assert 1024 <= low <= high <= 65535
    monkeypatch.setattr(layout, "CLAIMS_DIR", tmp_path / "claims")  # others' claims stay apart
    kernel = tmp_path / "ip_local_port_range"
    kernel.write_text("21000\t29000\n")  # a kernel whose range covers most of ours
    monkeypatch.setattr(layout, "_EPHEMERAL_FILE", kernel)
    mine, theirs = layout.PortClaims(), layout.PortClaims()
    chosen = pick_ports(claims=mine)
    service = {layout.free_port(set()) for _ in range(20)}
    assert all(20000 <= p < 21000 for p in chosen.values()), chosen  # gRPC at 30000-30999
    assert all(29000 < p <= layout.SERVICE_PORT_RANGE[1] for p in service), service
    # claimed ports are refused to another claimant and never chosen for it, until released
    with pytest.raises(SeaweedError, match="claimed by another process"):
        pick_ports(fixed={"s3": chosen["s3"]}, claims=theirs)
    for _ in range(10):
        assert set(pick_ports(claims=layout.PortClaims()).values()).isdisjoint(chosen.values())
    mine.release()
    assert pick_ports(fixed=chosen, claims=theirs) == chosen
    kernel.write_text("20000 40000\n")  # nothing of ours is left outside it
    with pytest.raises(SeaweedError, match="no free port for SeaweedFS master.*20000-40000"):
        pick_ports()


def test_start_refuses_a_busy_port_and_reports_a_dead_server(tmp_path):
    import socket

    with socket.socket() as busy:
        for port in range(24000, 26000):  # below 55535: its gRPC twin (+10000) must exist too
            try:
                busy.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        busy.listen()
        with pytest.raises(SeaweedError, match=f"{port}.*in use"):
            SeaweedS3(tmp_path / "busy", ports={"s3": port}).start()
    with pytest.raises(SeaweedError, match="cannot be used"):
        SeaweedS3(tmp_path / "high", ports={"s3": 60000}).start()
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'cannot start: disk on fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = SeaweedS3(tmp_path / "dead", weed_binary=fake, secret_key="Sup3r-secret-value")
    with pytest.raises(SeaweedError, match="exited with code 3(.|\n)*disk on fire") as err:
        server.start()
    assert "Sup3r-secret-value" not in str(err.value)
    assert server.pid is None and not (tmp_path / "dead" / "weed.pid").exists()


# -- listing ---------------------------------------------------------------------------------

def test_list_filters_extensions_case_insensitively(seaweed, s3_prefix):  # noqa: F811
    _put(seaweed, s3_prefix, MIXED)
    opts = seaweed.storage_options
    assert _names(list_objects(s3_prefix, storage=opts), s3_prefix) == MIXED_AUDIO
    assert _names(list_objects(s3_prefix + "/", storage=opts), s3_prefix) == MIXED_AUDIO
    assert _names(list_objects(s3_prefix, None, opts), s3_prefix) == set(MIXED)
    assert _names(list_objects(s3_prefix, [".TXT"], opts), s3_prefix) == {"notes.txt",
                                                                          "x.wav.txt"}
    # "sub" is a folder: "subway.wav" next to it is not inside it.
    assert _names(list_objects(f"{s3_prefix}/sub", storage=opts), s3_prefix) == {
        "sub/c.Mp3", "sub/e.opus", "sub/deep/d.ogg"}
    # One object lists itself, whatever its extension.
    (single,) = list_objects(f"{s3_prefix}/notes.txt", storage=opts)
    assert single.uri == f"{s3_prefix}/notes.txt" and single.size == 1 and single.etag
    assert single.mtime is not None
    assert list(list_objects(f"{s3_prefix}/nothing-here", storage=opts)) == []


def test_listing_streams_thousands_of_objects(seaweed, s3_prefix):  # noqa: F811
    n = 2000
    _put(seaweed, s3_prefix, {f"{i // 500:02d}/{i:05d}.wav": b"x" for i in range(n)})
    listing = list_objects(s3_prefix, storage=seaweed.storage_options)
    assert isinstance(listing, types.GeneratorType)
    first = next(listing)
    assert first.uri == f"{s3_prefix}/00/00000.wav"
    uris = [first.uri] + [info.uri for info in listing]
    assert len(uris) == n == len(set(uris))
    assert uris == sorted(uris)  # S3 key order, across page boundaries


def test_etag_changes_with_content(seaweed, s3_prefix, tmp_path):  # noqa: F811
    opts = seaweed.storage_options
    _put(seaweed, s3_prefix, {"a.wav": b"one"})
    (before,) = list_objects(s3_prefix, storage=opts)
    _put(seaweed, s3_prefix, {"a.wav": b"two"})
    (after,) = list_objects(s3_prefix, storage=opts)
    _put(seaweed, s3_prefix, {"a.wav": b"one"})
    (again,) = list_objects(s3_prefix, storage=opts)
    assert before.etag != after.etag and before.etag == again.etag  # content hash

    path = tmp_path / "a.wav"
    path.write_bytes(b"one")
    (local1,) = list_objects(str(path))
    path.write_bytes(b"three")
    (local2,) = list_objects(str(path))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    (local3,) = list_objects(str(path))
    assert len({local1.etag, local2.etag, local3.etag}) == 3
    assert list(list_objects(str(path))) == [local3]  # stable while untouched


def test_local_folder_listing(tmp_path):
    for name, data in MIXED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    infos = list(list_objects(str(tmp_path)))
    assert [i.uri for i in infos] == [str(tmp_path / n) for n in
                                      ("B.FLAC", "a.wav", "sub/c.Mp3", "sub/deep/d.ogg",
                                       "sub/e.opus", "subway.wav")]
    assert all(i.size == 1 and i.etag and i.mtime for i in infos)
    assert _names(list_objects(f"file://{tmp_path}", None), str(tmp_path)) == set(MIXED)
    with pytest.raises(StorageError) as err:
        list(list_objects(str(tmp_path / "missing")))
    assert err.value.kind == "not_found" and "missing" in str(err.value)


def test_local_listing_keeps_broken_links_and_reading_one_is_an_error_row(tmp_path):
    from pipelines.stages import DecodeStage

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.wav").write_bytes(b"a")
    (root / "dangling.wav").symlink_to(tmp_path / "nowhere" / "file.wav")
    (root / "loop.flac").symlink_to("loop.flac")  # a link to itself: ELOOP when followed
    (root / "dangling.txt").symlink_to(tmp_path / "nowhere" / "file.txt")  # not audio
    infos = list(list_objects(str(root)))
    assert [i.uri for i in infos] == [str(root / n) for n in ("a.wav", "dangling.wav",
                                                              "loop.flac")]
    assert infos[1] == ObjectInfo(str(root / "dangling.wav"))  # no size, etag or mtime
    assert open_input(str(root)).first.uri == str(root / "a.wav")

    with pytest.raises(StorageError) as err:
        fetch(infos[1])
    assert not isinstance(err.value, ObjectVanishedError)  # never readable, not vanished
    assert err.value.kind == "not_found"
    assert str(err.value) == (f"not_found: {root / 'dangling.wav'}: broken symbolic link: "
                              f"its target {str(tmp_path / 'nowhere' / 'file.wav')!r} "
                              "does not exist")

    plan = pa.Table.from_pylist([{"uri": i.uri, "size": i.size, "etag": i.etag}
                                 for i in infos[1:]])
    rows = pa.concat_tables(DecodeStage(None)(plan)).to_pylist()
    assert [(r["source_uri"], r["error_kind"]) for r in rows] == [
        (str(root / "dangling.wav"), "not_found"), (str(root / "loop.flac"), "io_error")]
    for row in rows:
        assert row["error_message"].startswith(f"{row['source_uri']}: broken symbolic link")


def test_local_listing_follows_linked_folders_and_stops_at_loops(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    (elsewhere / "x.wav").write_bytes(b"xx")
    (elsewhere / "deep" / "y.flac").write_bytes(b"y")
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.wav").write_bytes(b"a")
    (root / "linked").symlink_to(elsewhere)
    (root / "twice").symlink_to(elsewhere)  # the same folder again, under another path
    (root / "sub" / "up").symlink_to(root)  # a loop: a link to an ancestor
    (root / "sub" / "self").symlink_to(".")
    (elsewhere / "back").symlink_to(root)  # a loop through the linked folder
    (root / "b.wav").symlink_to(elsewhere / "x.wav")
    infos = list(itertools.islice(list_objects(str(root)), 50))  # a loop would never end
    assert [i.uri.removeprefix(f"{root}/") for i in infos] == [
        "a.wav", "b.wav", "linked/deep/y.flac", "linked/x.wav", "twice/deep/y.flac",
        "twice/x.wav"]
    x = os.stat(elsewhere / "x.wav")
    assert infos[3] == ObjectInfo(str(root / "linked" / "x.wav"), 2,
                                  f"{x.st_mtime_ns:x}-2", x.st_mtime)
    assert infos[1].etag == infos[3].etag == infos[5].etag
    loops = sorted(r.getMessage() for r in caplog.records if "not following" in r.getMessage())
    assert loops == [f"not following {root}/{link}: it links to a folder above it"
                     for link in ("linked/back", "sub/self", "sub/up", "twice/back")]


def test_other_fsspec_filesystems():
    import fsspec

    root = f"memory:///storage-test-{os.getpid()}"  # the canonical form of memory paths
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{root}/x/a.WAV": b"aa", f"{root}/x/b.txt": b"b", f"{root}/m.jsonl":
             b'{"uri": "x/a.WAV"}\n'})
    (info,) = list_objects(root)
    assert info.uri == f"{root}/x/a.WAV" and info.size == 2 and info.etag
    assert fetch(info) == b"aa"
    assert [i.uri for i in read_manifest(f"{root}/m.jsonl")] == [info.uri]
    assert open_input(f"{root}/x").is_prefix
    check_output(f"{root}/out")
    fs.rm(root, recursive=True)


# -- manifests -------------------------------------------------------------------------------

def test_manifests_in_three_formats(seaweed, s3_prefix, tmp_path):  # noqa: F811
    opts = seaweed.storage_options
    fs = _fs(seaweed)
    root = s3_prefix.removeprefix("s3://")
    _put(seaweed, s3_prefix, {"clips/a.wav": b"aa", "clips/b.flac": b"bbb"})
    etag = next(list_objects(f"{s3_prefix}/clips/a.wav", storage=opts)).etag
    table = pa.table({"uri": [f"{s3_prefix}/clips/a.wav", "clips/b.flac"],
                      "size": [2, None], "etag": [etag, None], "extra": [1, 2]})
    with fs.open(f"{root}/lists/m.parquet", "wb") as f:
        pq.write_table(table, f)
    fs.pipe({
        f"{root}/m.csv": b"source_uri,size\nclips/a.wav,2\n/other/x.wav,\n",
        f"{root}/lists/m.jsonl": b'{"path": "../clips/b.flac", "etag": "\\"e1\\""}\n\n'
                                 b'{"path": "s3://elsewhere/y.mp3"}\n',
        f"{root}/m.jsonl.gz": gzip.compress(b'{"uri": "clips/a.wav"}\n'),
    })

    assert list(read_manifest(f"{s3_prefix}/lists/m.parquet", opts)) == [
        ObjectInfo(f"{s3_prefix}/clips/a.wav", 2, etag),
        ObjectInfo(f"{s3_prefix}/lists/clips/b.flac"),
    ]
    bucket = s3_prefix.split("/")[2]
    assert list(read_manifest(f"{s3_prefix}/m.csv", opts)) == [
        ObjectInfo(f"{s3_prefix}/clips/a.wav", 2), ObjectInfo(f"s3://{bucket}/other/x.wav")]
    assert list(read_manifest(f"{s3_prefix}/lists/m.jsonl", opts)) == [
        ObjectInfo(f"{s3_prefix}/clips/b.flac", None, "e1"), ObjectInfo("s3://elsewhere/y.mp3")]
    assert [i.uri for i in read_manifest(f"{s3_prefix}/m.jsonl.gz", opts)] == [
        f"{s3_prefix}/clips/a.wav"]

    local = tmp_path / "lists" / "m.csv"
    local.parent.mkdir()
    local.write_text(f"uri\n../audio/a.wav\n{tmp_path}/abs.wav\n")
    assert [i.uri for i in read_manifest(str(local))] == [str(tmp_path / "audio" / "a.wav"),
                                                         str(tmp_path / "abs.wav")]


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("nouri.csv", b"file,size\na.wav,1\n", "no uri/source_uri/path column"),
    ("nouri.jsonl", b'{"file": "a.wav"}\n', "no uri/source_uri/path column"),
    ("broken.jsonl", b'{"uri": "a.wav"}\n{not json\n', "line 2: not JSON"),
    ("badsize.csv", b"uri,size\na.wav,big\n", "row 1: size 'big' is not an integer"),
    ("empty.csv", b"", "empty CSV"),
    ("corrupt.parquet", b"not a parquet file at all", "unreadable parquet manifest"),
    ("list.txt", b"a.wav\n", "unknown manifest format"),
])
def test_bad_manifest(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(StorageError) as err:
        list(read_manifest(str(path)))
    assert err.value.kind == "bad_manifest"
    assert name in str(err.value) and problem in str(err.value)


def test_bad_manifest_on_s3(seaweed, s3_prefix):  # noqa: F811
    opts = seaweed.storage_options
    table = pa.table({"file": ["a.wav"]})
    with _fs(seaweed).open(f"{s3_prefix.removeprefix('s3://')}/m.parquet", "wb") as f:
        pq.write_table(table, f)
    with pytest.raises(StorageError, match="no uri/source_uri/path column") as err:
        list(read_manifest(f"{s3_prefix}/m.parquet", opts))
    assert err.value.kind == "bad_manifest" and f"{s3_prefix}/m.parquet" in str(err.value)
    with pytest.raises(StorageError) as err:
        list(read_manifest(f"{s3_prefix}/missing.parquet", opts))
    assert err.value.kind == "not_found"


# -- credentials and preflight checks --------------------------------------------------------

@pytest.mark.parametrize(("key", "reason"), [(None, "secret key does not match"),
                                             ("AKUNKNOWN0000", "access key id is unknown")])
def test_bad_credentials_are_access_denied_without_the_secret(seaweed, s3_prefix,  # noqa: F811
                                                              key, reason):
    _put(seaweed, s3_prefix, {"a.wav": b"a"})
    opts = {**seaweed.storage_options, "secret": "Wr0ng-secret-do-not-print"}
    if key:
        opts["key"] = key
    calls = {"list": lambda: list(list_objects(s3_prefix, storage=opts)),
             "open prefix": lambda: open_input(s3_prefix, opts),
             "open object": lambda: open_input(f"{s3_prefix}/a.wav", opts),
             "check_output": lambda: check_output(f"{s3_prefix}/out", opts),
             "fetch": lambda: fetch(f"{s3_prefix}/a.wav", opts)}
    for name, call in calls.items():
        with pytest.raises(StorageError) as err:
            call()
        message = str(err.value)
        assert err.value.kind == "access_denied", message
        assert s3_prefix in message
        assert "Wr0ng-secret" not in message
        _no_secrets(seaweed, message)
        if name != "fetch":  # s3fs's GET surfaces a bare 403; the preflight names the cause
            assert reason in message, message


def test_no_credentials(seaweed, s3_prefix, monkeypatch):  # noqa: F811
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    opts = {"client_kwargs": {"endpoint_url": seaweed.endpoint_url}}
    for call in (lambda: open_input(s3_prefix, opts), lambda: check_output(s3_prefix, opts)):
        with pytest.raises(StorageError) as err:
            call()
        assert err.value.kind == "no_credentials" and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_env_var_route(seaweed, s3_prefix, monkeypatch):  # noqa: F811
    _put(seaweed, s3_prefix, {"a.wav": b"a"})
    for name, value in seaweed.env.items():
        monkeypatch.setenv(name, value)
    assert [i.uri for i in list_objects(s3_prefix)] == [f"{s3_prefix}/a.wav"]
    assert fetch(f"{s3_prefix}/a.wav") == b"a"
    check_output(s3_prefix + "/out")


def test_missing_bucket(seaweed):  # noqa: F811
    opts = seaweed.storage_options
    for call in (lambda: list(list_objects("s3://no-such-bucket/x", storage=opts)),
                 lambda: open_input("s3://no-such-bucket/x", opts),
                 lambda: check_output("s3://no-such-bucket/out", opts),
                 lambda: fetch("s3://no-such-bucket/x.wav", opts)):
        with pytest.raises(StorageError) as err:
            call()
        assert err.value.kind == "bucket_missing", str(err.value)
        assert "s3://no-such-bucket" in str(err.value)
    # SeaweedFS would create the bucket on an admin PUT unless -s3.autoCreateBucket=false.
    assert not _fs(seaweed).exists("no-such-bucket")


def test_open_input(seaweed, s3_prefix, tmp_path):  # noqa: F811
    opts = seaweed.storage_options
    _put(seaweed, s3_prefix, {"dir/a.wav": b"a"})
    obj = open_input(f"{s3_prefix}/dir/a.wav", opts)
    assert obj == InputInfo(f"{s3_prefix}/dir/a.wav", False, obj.first) and obj.first.size == 1
    folder = open_input(f"{s3_prefix}/dir", opts)
    assert folder.is_prefix and folder.first.uri == f"{s3_prefix}/dir/a.wav"
    assert open_input(f"{s3_prefix}/dir/a.wav", seaweed.storage_options_for("reader"))
    with pytest.raises(StorageError) as err:
        open_input(f"{s3_prefix}/di", opts)
    assert err.value.kind == "not_found"
    with pytest.raises(StorageError) as err:
        open_input(str(tmp_path / "nothing"))
    assert err.value.kind == "not_found"
    (tmp_path / "x.wav").write_bytes(b"x")
    assert not open_input(str(tmp_path / "x.wav")).is_prefix
    assert open_input(str(tmp_path)).is_prefix


def test_check_output(seaweed, s3_prefix, tmp_path):  # noqa: F811
    check_output(f"{s3_prefix}/out", seaweed.storage_options)
    assert list(list_objects(s3_prefix, None, seaweed.storage_options)) == []  # probe deleted

    with pytest.raises(StorageError) as err:
        check_output(f"{s3_prefix}/out", seaweed.storage_options_for("reader"))
    assert err.value.kind == "access_denied" and f"{s3_prefix}/out" in str(err.value)
    _no_secrets(seaweed, str(err.value))

    check_output(str(tmp_path / "new" / "out"))
    assert list((tmp_path / "new" / "out").iterdir()) == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a folder"):
        check_output(str(tmp_path / "file"))


def test_fetch_and_vanished(seaweed, s3_prefix, tmp_path):  # noqa: F811
    opts = seaweed.storage_options
    _put(seaweed, s3_prefix, {"a.wav": b"payload"})
    (info,) = list_objects(s3_prefix, storage=opts)
    assert fetch(info, opts) == b"payload"
    _fs(seaweed).rm_file(info.uri)
    with pytest.raises(ObjectVanishedError) as err:
        fetch(info, opts)
    assert err.value.kind == "vanished" and isinstance(err.value, StorageError)
    assert info.uri in str(err.value)

    path = tmp_path / "b.wav"
    path.write_bytes(b"local")
    assert fetch(str(path)) == b"local"
    path.unlink()
    with pytest.raises(ObjectVanishedError):
        fetch(str(path))


def test_fetched_decodes_a_large_object_from_a_local_copy_then_removes_it(
        seaweed, s3_prefix, tmp_path):  # noqa: F811
    opts = seaweed.storage_options
    payload = os.urandom(3000)
    _put(seaweed, s3_prefix, {"big.wav": payload})
    uri = f"{s3_prefix}/big.wav"
    with fetched(uri, opts, size=3000, spool_bytes=1000) as (data, size):
        assert isinstance(data, str) and size == 3000
        assert open(data, "rb").read() == payload
        copy = data
    assert not os.path.exists(copy) and not os.path.exists(os.path.dirname(copy))
    for known in (3000, None):  # small enough, or size unknown: the bytes
        with fetched(uri, opts, size=known, spool_bytes=4000 if known else 0) as (data, size):
            assert data == payload and size == 3000

    local = tmp_path / "big.wav"
    local.write_bytes(payload)
    with fetched(str(local), size=3000, spool_bytes=1000) as (data, size):
        assert data == str(local) and size == 3000  # a local object is read in place
    assert local.exists()

    _fs(seaweed).rm_file(uri)
    local.unlink()
    for gone in (uri, str(local)):
        with pytest.raises(ObjectVanishedError) as err:
            with fetched(gone, opts, size=3000, spool_bytes=1000):
                pass
        assert gone in str(err.value)


# -- redaction -------------------------------------------------------------------------------

def test_redaction(seaweed):  # noqa: F811
    secret = seaweed.admin.secret_key
    config = StorageConfig.coerce({**seaweed.storage_options, "token": "tok-123456"})
    safe = config.safe()
    # what may be shown or stored (as a flow parameter) holds no credential
    text = json.dumps(safe) + repr(config) + config.model_dump_json()
    for hidden in (secret, "tok-123456", seaweed.admin.access_key):
        assert hidden not in text
    assert safe["key"].startswith(seaweed.admin.access_key[:4]) and safe["key"].endswith("***")
    assert safe["endpoint_url"] == seaweed.endpoint_url
    assert config.s3fs_options()["secret"] == secret  # in memory, for s3fs only
    assert StorageConfig().safe() == {}
    # other secrets have no place that keeps them out of stored parameters: refused
    for options, name in (({"password": "hunter2"}, "password"),
                          ({"config_kwargs": {"api_key": "k-987654"}}, "config_kwargs.api_key")):
        with pytest.raises(ValueError, match=f"secret-looking storage options \\['{name}'\\]"):
            StorageConfig.coerce(options)
    assert redact("abcdef") == "***" and redact("") == ""
    assert redact_uri("s3://AKID1234:s3cr3t@bucket/key") == "s3://AK***:***@bucket/key"
    assert "s3cr3t" not in str(StorageError("s3://AKID1234:s3cr3t@b/k", "x", "io_error"))
    # A secret that sneaks into a backend message is scrubbed.
    err = storage.storage_error(OSError(f"boom {secret}"), "s3://b/k", seaweed.storage_options)
    assert secret not in str(err) and err.kind == "io_error"
