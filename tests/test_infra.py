"""Deployment configuration under infra/: it parses, has the shape KubeRay, Prefect and Docker
expect, agrees with the code it launches, and holds no literal secret.

Static checks only (no cluster, no Prefect server); a deployment's parameters are checked by
its flow's own parameter model.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
PREFECT_YAML = INFRA / "prefect" / "prefect.yaml"
WORK_POOL = INFRA / "prefect" / "work-pool.json"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
POOL_NAME = "kimi-label-pool"
DEPLOYMENTS = {
    "label-corpus": "flows/label_corpus_on_ray.py:label_corpus_on_ray",
    "transcribe-archive": "flows/transcribe_archive.py:transcribe_archive",
    "prepare-training-data": "flows/prepare_training_data.py:prepare_training_data",
    "evaluate": "flows/evaluate.py:evaluate_flow",
}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY"
                         r"|^(secret|token|password|auth_token)$")


def load_yaml(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document"
    return docs[0]


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*")
                  if p.is_file() and p.name != "constraints-cpu.txt")


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


# -- every file ------------------------------------------------------------------------------

def test_expected_files_exist():
    for path in (RAYCLUSTER, RAYJOB, PREFECT_YAML, WORK_POOL, DOCKERFILE, INFRA / "DEPLOY.md"):
        assert path.is_file(), path


@pytest.mark.parametrize("path", [p for p in infra_files() if p.suffix in (".yaml", ".yml", ".json")],
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_config_files_parse(path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(path.read_text()) if d)


def test_no_literal_secrets_in_infra():
    # 1. text: a secret-looking assignment must take its value from a variable or stand-in
    assignment = re.compile(
        r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN|PREFECT_API_KEY|auth_token"
        r"|\"secret\")[\"']?\s*[=:]\s*[\"']?([^\s\"',}]*)")
    for path in infra_files():
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{path}: an AWS key id"
        for match in assignment.finditer(text):
            value = match.group(2)
            assert value == "" or value[0] in "$.<{", f"{path}: literal {match.group(0)!r}"
    # 2. structure: env entries with secret-like names come from a Secret, never a literal; no
    #    Secret objects; no secret-like keys with values in JSON/YAML mappings (work pool, job vars)
    for path in infra_files():
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        docs = ([json.loads(path.read_text())] if path.suffix == ".json"
                else [d for d in yaml.safe_load_all(path.read_text()) if d])
        for doc in docs:
            assert doc.get("kind") != "Secret", f"{path}: a Secret manifest with values"
            for node in walk(doc):
                if not isinstance(node, dict):
                    continue
                if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) \
                        and ("value" in node or "valueFrom" in node):
                    assert "value" not in node, f"{path}: literal value for {node['name']}"
                    assert "secretKeyRef" in node["valueFrom"], f"{path}: {node['name']}"
                for key, value in node.items():
                    if isinstance(key, str) and SECRET_NAME.search(key) and key != "secretKeyRef":
                        assert not isinstance(value, (str, int)) or value in ("", None), \
                            f"{path}: literal value for {key}"


# -- KubeRay ---------------------------------------------------------------------------------

def check_cluster_spec(spec: dict) -> str:
    """The RayClusterSpec shape both manifests share; returns the image."""
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0", "no work on the head"
    assert params["dashboard-host"] == "0.0.0.0"
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
    head_container = head["template"]["spec"]["containers"][0]
    image = head_container["image"]
    assert image and "nvidia.com/gpu" not in head_container["resources"].get("limits", {})

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == image, "one image for head and workers"
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            assert "secretKeyRef" in env[name]["valueFrom"], name
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    # the driver runs on the head and checks the checkpoint there
    assert "/models" in {m["mountPath"] for m in head_container["volumeMounts"]}
    return image


def test_raycluster_shape():
    doc = load_yaml(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    check_cluster_spec(doc["spec"])
    # manual token auth: the same token Secret on every Ray container
    spec = doc["spec"]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_rayjob_shape_and_entrypoint():
    from pipelines.job.__main__ import parse_spec

    doc = load_yaml(RAYJOB)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    if "rayClusterSpec" in spec:
        image = check_cluster_spec(spec["rayClusterSpec"])
        assert image == load_yaml(RAYCLUSTER)["spec"]["headGroupSpec"]["template"]["spec"][
            "containers"][0]["image"]

    # the job itself, without Prefect (no throw-away Prefect server in the head pod)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipelines.job", "--spec"] and len(argv) == 5
    job = parse_spec(argv[4])  # a valid job
    # on a Ray node the job must join the running cluster, not start its own
    assert job.ray_address == "auto"
    assert job.input.startswith("s3://") and job.output.startswith("s3://")
    assert job.model == "/models/Kimi-Audio-7B-Instruct"
    assert job.tasks == ["asr", "emotion", "scene"]
    assert json.loads(argv[4])["stages"]["decode"]["concurrency"] == job.stages.decode.concurrency
    assert "PREFECT_API_URL" not in spec["entrypoint"]


# -- Prefect ---------------------------------------------------------------------------------

def test_prefect_deployments():
    from prefect.client.schemas.schedules import CronSchedule

    doc = load_yaml(PREFECT_YAML)
    deployments = {d["name"]: d for d in doc["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    for name, dep in deployments.items():
        assert dep["entrypoint"] == DEPLOYMENTS[name]
        assert re.fullmatch(r"flows/[a-z_]+\.py:[a-z_]+", dep["entrypoint"])
        assert dep["work_pool"]["name"] == POOL_NAME
        if dep.get("parameters"):  # valid parameters of the flow: its own model checks them
            file, func = dep["entrypoint"].split(":")
            flow = getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")),
                           func)
            flow.validate_parameters(dep["parameters"])

    schedules = deployments["label-corpus"]["schedules"]
    assert len(schedules) == 1
    schedule = CronSchedule(cron=schedules[0]["cron"], timezone=schedules[0]["timezone"])
    assert schedule.cron == "0 3 * * *"
    assert not deployments["transcribe-archive"].get("schedules")
    assert not deployments["prepare-training-data"].get("schedules")

    # label-corpus submits to the RayCluster's Jobs API; no Ray Client anywhere
    params = deployments["label-corpus"]["parameters"]["params"]
    assert params["model"] == "/models/Kimi-Audio-7B-Instruct"
    assert "ray_address" not in params
    assert deployments["label-corpus"]["parameters"]["ray_dashboard"] == \
        "http://kimi-label-head-svc:8265"
    assert "ray://" not in PREFECT_YAML.read_text()

    # the pull steps move into KIMI_LABEL_SOURCE, by default where the image keeps the source
    shell, chdir = doc["pull"]
    script = shell["prefect.deployments.steps.run_shell_script"]
    workdirs = [rest for kw, rest in dockerfile_instructions() if kw == "WORKDIR"]
    assert script["script"].startswith(f'cd "${{KIMI_LABEL_SOURCE:-{workdirs[-1]}}}" && pwd')
    assert script["shell"] is True
    assert chdir == {"prefect.deployments.steps.set_working_directory":
                     {"directory": f"{{{{ {script['id']}.stdout }}}}"}}


def test_work_pool_base_job_template():
    jsonschema = pytest.importorskip("jsonschema")
    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads(WORK_POOL.read_text())
    assert set(template) == {"job_configuration", "variables"}
    job_config, variables = template["job_configuration"], template["variables"]
    # the keys are the process worker's configuration fields
    assert set(job_config) <= set(ProcessJobConfiguration.model_fields)
    # the server's rule: every {{ placeholder }} is a declared variable
    placeholders = set(re.findall(r"{{\s*([\w.]+)\s*}}", json.dumps(job_config)))
    assert placeholders <= set(variables["properties"])
    assert variables["type"] == "object"
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)
    # each deployment's job_variables fit the schema too
    for dep in load_yaml(PREFECT_YAML)["deployments"]:
        job_vars = dep["work_pool"].get("job_variables") or {}
        assert set(job_vars) <= set(variables["properties"])
        jsonschema.validate({**defaults, **job_vars}, variables)


# -- Docker ----------------------------------------------------------------------------------

def test_dockerfile():
    instructions = dockerfile_instructions()
    keywords = [kw for kw, _ in instructions]
    assert keywords.count("FROM") == 1 and "ENTRYPOINT" not in keywords
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert re.search(r"pip install [^&;]*\s\.(\s|$)", runs), "installs the project"
    assert re.search(r"pip install --index-url \S+ \S*torch", runs), "a CUDA torch, chosen"
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), "does not run as root"
    envs = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "HF_HUB_OFFLINE=1" in envs
    copied = " ".join(rest for kw, rest in instructions if kw == "COPY")
    for part in ("pyproject.toml", "kimi_ops", "pipelines", "flows"):
        assert part in copied


def test_deploy_guide_covers_the_steps():
    text = (INFRA / "DEPLOY.md").read_text()
    for needle in ("glm-4-voice-tokenizer", "--glm-tokenizer", "AWS_ENDPOINT_URL",
                   "--storage-options", "docker build", "kubectl create secret",
                   "rayjob.yaml", "--ray-address", "prefect work-pool create", "prefect deploy",
                   "worker start", "--stages"):
        assert needle in text, needle
