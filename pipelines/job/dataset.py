"""The Ray adapter: a job's stages turned into one Ray Data pipeline.

Each stage (`pipelines.stages.base.Stage`) declares how it runs; this module is the only place
that turns that into `map_batches` arguments: an actor stage runs in an `ActorPoolStrategy` of
`concurrency` actors that each call `setup()` once, a task stage in a `TaskPoolStrategy` of
`concurrency` parallel tasks; both batch `batch_size` rows as pyarrow tables, ask for `num_cpus`
(and `num_gpus`), and survive `max_restarts` worker deaths.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

from pipelines.job.ray_cluster import driver_log_level
from pipelines.spec import JobSpec
from pipelines.stages.base import Stage


class _StageActor:
    """A stage in a Ray actor: set up once, then called batch by batch."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def __call__(self, batch):
        return self.stage(batch)


def _actor_class(stage: Stage) -> type:
    """`_StageActor` named after the stage: Ray Data names its operator, its progress lines,
    its stats and the actors' process titles after the class (`MapBatches(LabelStage)`)."""
    name = type(stage).__name__
    return type(name, (_StageActor,), {"__qualname__": name})


def _as_task(stage: Stage):
    def run(batch):
        stage.setup()  # a task stage's setup is cheap and idempotent
        return stage(batch)

    run.__name__ = run.__qualname__ = type(stage).__name__  # as `_actor_class`
    return run


def job_stages(spec: JobSpec, model_id: str, run_id: str, writer: Stage) -> list[Stage]:
    """The stages of `spec`'s job, ending in `writer`. Looked up on `pipelines.stages` when
    called (tests replace a stage there with a subclass)."""
    from pipelines import stages

    s = spec.stages
    return [
        stages.PlanReader(spec.output, spec.storage_options, spec.storage_retry, s.decode),
        stages.DecodeStage(spec.storage_options, retry=spec.storage_retry,
                           max_audio_seconds=spec.max_audio_seconds,
                           piece_seconds=spec.piece_seconds, segmenter=spec.segmenter,
                           resources=s.decode),
        stages.FrontendStage(spec.model, spec.glm_tokenizer, spec.device, resources=s.frontend),
        stages.LabelStage(spec.model, spec.glm_tokenizer, spec.device, spec.tasks,
                          spec.task_params(), spec.max_new_tokens, spec.semantic_tokens,
                          model_id, run_id, segmenter=spec.segmenter, resources=s.label),
        writer,
    ]


def build_dataset(stages: Sequence[Stage], units: list[dict], no_progress_timeout_s: float,
                  inflight_bytes: int, ray_progress_bars: bool = True):
    """The dataset of `units` (plan work units) through `stages`, one `map_batches` each.
    `ray_progress_bars=False`: while the run's own progress is drawn (`pipelines.job.progress`),
    Ray Data's per-operator bars (off a terminal, its progress log lines) are off."""
    import ray

    ctx = ray.data.DataContext.get_current()
    _ray_data_console(ctx, ray_progress_bars)
    ctx.execution_options.preserve_order = False
    ctx.execution_no_progress_timeout_s = no_progress_timeout_s
    # the queues between the stages stop at a fixed budget (`placement.inflight_budget`), not
    # at half the object store, so what the stages hold and touch does not grow with the corpus
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=inflight_bytes)
    # a stage's StorageError reaches the driver as itself (kind, URI), not as a bare
    # UserCodeException whose cause Ray drops on the way
    ctx.raise_original_map_exception = True
    ds = ray.data.from_items(units, override_num_blocks=max(len(units), 1))
    # Ray 2.60 takes the retry settings only through `**ray_remote_args`, which it deprecates
    # for named parameters that arrive in 2.64 (hence the pin below it): not for users' eyes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        for stage in stages:
            ds = map_stage(ds, stage)
    return ds


def _ray_data_console(ctx, progress_bars: bool) -> None:
    """What Ray Data prints here: its progress bars or not, its lines at the driver's level
    (`ray_cluster.driver_log_level`; its log file under the session keeps every line)."""
    ctx.enable_progress_bars = progress_bars
    if not progress_bars:  # its warning that they are off: we turned them off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(driver_log_level())


def map_stage(ds, stage: Stage):
    """`ds.map_batches` of one stage, with the arguments its resources say."""
    import ray
    from ray.data import ActorPoolStrategy

    r = stage.resources
    common = {"batch_format": "pyarrow", "batch_size": r.batch_size, "num_cpus": r.num_cpus}
    if stage.actor:
        return ds.map_batches(_actor_class(stage), fn_constructor_args=(stage,), **common,
                              num_gpus=r.num_gpus or None, max_restarts=r.max_restarts,
                              max_task_retries=r.max_restarts,
                              compute=ActorPoolStrategy(size=r.concurrency))
    return ds.map_batches(_as_task(stage), **common, max_retries=r.max_restarts,
                          compute=ray.data.TaskPoolStrategy(size=r.concurrency))
