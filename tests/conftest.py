import os

# OpenMP threads that finish a parallel region sleep at once instead of spinning (GNU OpenMP
# spins for a while by default). Two test workers, and the Ray workers and commands they start
# (which inherit this environment), each run torch with two threads on two cores: spinning
# threads then burn the cores the others wait for. On the engine, task and front-end tests
# (-n 2) this took the wall time from 130 s to 43 s and the CPU time from 252 to 75 s.
# libgomp reads it once, when torch loads it: so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import goldens  # noqa: E402

torch.set_num_threads(2)

# Every Ray the suite starts (the session's, and a job's own in a subprocess, which inherits
# this environment) starts no idle workers ahead of demand and exports no metrics: a local Ray
# at rest then takes 1.2 CPU-seconds in 30 s instead of 2.3 (its two prestarted workers polled),
# and a 40-file job with its own Ray 40 instead of 47, on two cores the suite saturates. Tests
# of the stack's services and of what they expose start theirs without these (they leave out
# every RAY_ variable), as a user's would run.
QUIET_RAY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_worker_prestart": "0",
             "RAY_prestart_worker_first_driver": "0", "RAY_enable_metrics_collection": "0"}
for _name, _value in QUIET_RAY.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def tiny_model():
    """The language model of the shared tiny checkpoint, fp32 on CPU."""
    from kimi_ops.model.config import KimiAudioConfig
    from kimi_ops.model.modeling import KimiAudioForCausalLM
    from kimi_ops.model.weights import load_state_dict

    goldens.require()
    config = KimiAudioConfig.from_file(goldens.CHECKPOINT / "config.json")
    with torch.device("meta"):
        model = KimiAudioForCausalLM(config)
    load_state_dict(model, goldens.CHECKPOINT, torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from kimi_ops.model.text_tokenizer import TextTokenizer

    goldens.require()
    return TextTokenizer(goldens.CHECKPOINT / "tiktoken.model")


@pytest.fixture(scope="session")
def engine():
    """The full KimiAudio API on the shared tiny checkpoint, made with the keywords of the
    reference's README (`model_path`, `load_detokenizer=False`) and imported as users do."""
    from kimi_ops import KimiAudio

    goldens.require()
    return KimiAudio(model_path=goldens.CHECKPOINT, load_detokenizer=False, device="cpu")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the session (loopback, short temp dir: Ray's unix socket paths must stay
    under 107 bytes, which pytest's tmp paths exceed), started when a test first asks for it.
    Yields the temp dir (worker logs). A job run while it is up uses it instead of its own."""
    import shutil
    import tempfile

    import ray

    from pipelines.job.ray_cluster import loopback_ray

    temp = tempfile.mkdtemp(prefix="kl-ray-", dir="/tmp")
    with loopback_ray():
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                 _temp_dir=temp, log_to_driver=False)
    yield temp
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session Ray's address (GCS host:port), for a command in a subprocess to join with
    `--ray-address`, as a user's job joins a cluster: it skips starting a Ray of its own (about
    fifteen CPU-seconds of daemons and Ray's own actors). The tests of a job's own local Ray
    (its loopback binding, signals while it starts) leave it out."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def harness():
    """Prefect's test harness (a temporary server and database) for the session, started when
    a test first asks for it (each start costs about ten seconds)."""
    import os

    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry from the server
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def here(capfd, monkeypatch):
    """`kimi-label ARGS` run in this process (the same console, without an interpreter's start
    for each case): a result with `returncode`, `stdout` and `stderr`, as a subprocess gives.
    A Prefect API the session set up (the harness) stays this process's. For refusals and
    commands that run no flow: a flow run here would leave Prefect's console log handler
    bound to this test's captured stream, closed once the test ends."""
    import types

    from flows.console import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    def run(*args):
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run
