"""Where a job's stages run and how much they hold: the placement of `JobSpec.stages` on the
cluster it found, and the object-store budget of the blocks in flight between the stages.
Explicit settings always win; these fill in only what a user left unset."""

from __future__ import annotations

from pipelines.spec import JobSpec

INFLIGHT_BYTES = 128 << 20  # CPU-only; 2 CPUs, 256 files: 64 MiB held the stages back (1.1x slower)
DECODE_TASKS_PER_GPU = 4  # see `place_io_tasks`
INFLIGHT_BYTES_PER_GPU = 1 << 30  # a 30 s segment's features: 3.8 MB in bf16 (full model)


def place(spec: JobSpec, gpus: float, nodes: int, node_cpus: float) -> JobSpec:
    """`spec` with its stages placed on a cluster of `nodes` nodes, `gpus` GPUs in all and
    `node_cpus` CPUs on its smallest node, and its in-flight budget set."""
    spec = place_io_tasks(place_on_cpus(place_on_gpus(spec, gpus), node_cpus), gpus, nodes)
    return spec.model_copy(update={"inflight_bytes": inflight_budget(spec, gpus, nodes)})


def _with_stages(spec: JobSpec, update: dict) -> JobSpec:
    if not update:
        return spec
    return spec.model_copy(update={"stages": spec.stages.model_copy(update=update)})


def place_on_gpus(spec: JobSpec, gpus: float) -> JobSpec:
    """With GPUs in the cluster and no GPU placement configured, put one front-end actor
    (a quarter GPU) and one label actor (the rest) on every GPU. Explicit settings win."""
    whole, stages = int(gpus), spec.stages
    if whole < 1 or stages.frontend.num_gpus or stages.label.num_gpus:
        return spec
    return _with_stages(spec, {
        "frontend": stages.frontend.model_copy(update={
            "num_gpus": 0.25, "concurrency": whole,
            "batch_size": max(stages.frontend.batch_size, 16)}),
        "label": stages.label.model_copy(update={
            "num_gpus": 0.75, "concurrency": whole,
            "batch_size": max(stages.label.batch_size, 32)}),
    })


def place_io_tasks(spec: JobSpec, gpus: float, nodes: int) -> JobSpec:
    """Unless their concurrency is set, enough decode and write tasks to feed the model actors:
    one decode task per node on CPUs, and with GPUs `DECODE_TASKS_PER_GPU` decode tasks and one
    writer per GPU. At the 1000x real-time target a GPU takes about 33 clips of 30 s a second,
    while one decode task fetches each object (tens of ms from S3) and decodes it (tens of ms
    for 30 s of MP3) one after another: a single task for the cluster, the default, would
    starve it (estimated; no GPU run measured it yet)."""
    whole = int(gpus)
    want = {"decode": max(nodes, DECODE_TASKS_PER_GPU * whole, 1), "write": max(whole, 1)}
    stages = spec.stages
    return _with_stages(spec, {name: getattr(stages, name).model_copy(update={"concurrency": n})
                               for name, n in want.items()
                               if "concurrency" not in getattr(stages, name).model_fields_set})


def place_on_cpus(spec: JobSpec, node_cpus: float) -> JobSpec:
    """On CPUs, and unless set, the front-end and label actors get torch threads for a node's
    CPUs over the stage's actor count. With a fraction of a CPU apiece Ray gives each one
    thread, yet their work alternates more than it overlaps (a label batch waits for its
    front-end batch), so a lone busy stage left a core idle: 2 CPUs, 256 files, 1.5x faster."""
    update = {}
    for name in ("frontend", "label"):
        stage = getattr(spec.stages, name)
        if stage.threads is None and not stage.num_gpus:
            threads = max(int(node_cpus) // stage.concurrency, 1)
            update[name] = stage.model_copy(update={"threads": threads})
    return _with_stages(spec, update)



def inflight_budget(spec: JobSpec, gpus: float, nodes: int = 1) -> int:
    """Object-store bytes of the job's blocks in flight: `spec.inflight_bytes`, else 1 GiB per
    GPU (feature blocks of long audio are large; the GPU stages must not wait on each other) or,
    without GPUs, 128 MiB per node (Ray Data's budget is one figure for the whole cluster: a
    fixed 128 MiB would feed about four 32-file units at a time, whatever the node count).
    Fixed, whatever the corpus size."""
    if spec.inflight_bytes is not None:
        return spec.inflight_bytes
    whole = int(gpus)
    return whole * INFLIGHT_BYTES_PER_GPU if whole >= 1 else max(nodes, 1) * INFLIGHT_BYTES


def local_object_store_bytes(spec: JobSpec, gpus: float = 0) -> int:
    """The object store of the job's own local Ray: twice the in-flight budget (Ray Data
    budgets half of a store; Ray's minimum is 75 MiB), so what the stages' shared memory can
    reach is bounded by configuration, not by the RAM. An object larger than the store still
    goes through (Ray's fallback allocation, a file in Ray's temp folder)."""
    from pipelines.job.ray_cluster import object_store_minimum

    return max(2 * inflight_budget(spec, gpus), object_store_minimum())

