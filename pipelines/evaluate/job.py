"""The evaluate job on Ray Data: per-shard readers turn benchmark rows into questions,
the caption processor (decode + preprocess on CPU, then the TroL predictor pool) answers
them with each row's own prompt, and the driver scores the replies and writes the outputs.

    from_items(shard tasks) → read_questions (a generator per shard) → caption processor
      (prompt_column="prompt") → driver: score, metrics, predictions.parquet + metrics.json

A bad image is a row with an error from the processor; a row that cannot be asked never
reaches the model (its image is left out) and keeps its own reason; both count as wrong
and are reported apart. A shard that cannot be read is left out whole and named.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from ..specs import SpecError
from ..storage import Storage, StorageError
from .plan import ROW_COLUMN, SHARD_COLUMN, SHARD_FAILED, EvaluationPlan, ShardTask, plan_benchmarks, read_shard
from .benchmark_spec import BenchmarkSpec
from .results import evaluation_metrics, score_replies, write_outputs
from .rows import ASKED_COLUMNS
from .spec import EvaluateSpec

log = logging.getLogger(__name__)

REPLY_COLUMNS = ("caption", "error", "num_tokens")  # what the caption processor adds
READ_CPUS = 0.25  # reading a shard is I/O and a little Python; leave the CPUs to decoding and the model


def plan_evaluation(spec: EvaluateSpec) -> EvaluationPlan:
    """Every check a bad spec can fail, before Ray starts or a model loads."""
    try:
        storage = Storage.from_environment(spec.storage.endpoint_url, spec.storage.region)
    except StorageError as exc:
        raise SpecError("storage", str(exc)) from None
    return plan_benchmarks(spec.benchmarks, spec.model, spec.output, storage)


def read_questions(batch: pa.Table, *, tasks: list[ShardTask], benchmarks: list[BenchmarkSpec],
                   storage: Storage):
    """Ray Data stage: one item (a task index) in, that shard's questions out, a batch at a time."""
    for index in batch.column("task").to_pylist():
        task = tasks[index]
        yield from read_shard(task, benchmarks[task.bench], storage)


def processor_config(spec: EvaluateSpec) -> dict[str, Any]:
    """The caption processor's settings for answering questions: each row's prompt, greedy."""
    return dict(model=spec.model, prompt_column="prompt", image_column="image",
                generation={"max_new_tokens": spec.max_new_tokens, "do_sample": False},
                batch_size=spec.batch_size, concurrency=spec.concurrency, cpus_per_actor=spec.cpus_per_actor,
                gpus_per_actor=spec.gpus_per_actor, dtype=spec.dtype, quantize=spec.quantize,
                max_image_pixels=spec.max_image_pixels, model_cache_dir=spec.model_cache_dir,
                storage=spec.storage.model_dump())


def generate_replies(plan: EvaluationPlan, spec: EvaluateSpec) -> list[dict[str, Any]]:
    """Every question with its reply (or error), collected on the driver (text only: the
    processor drops the image column)."""
    import ray

    from ..caption import build_caption_processor

    if not plan.tasks:
        return []
    answer = build_caption_processor(processor_config(spec))
    ds = ray.data.from_items([{"task": i} for i in range(len(plan.tasks))], override_num_blocks=len(plan.tasks))
    context = ds.context  # this dataset's own copy; Ray's global DataContext is left alone
    context.max_errored_blocks = -1  # a lost batch fails its shard (score_replies checks the counts), not the run
    context.execution_no_progress_timeout_s = spec.stall_timeout_s
    ds = ds.map_batches(read_questions, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                        fn_kwargs=dict(tasks=plan.tasks, benchmarks=plan.benchmarks, storage=plan.storage))
    ds = answer(ds).select_columns([*ASKED_COLUMNS, SHARD_COLUMN, ROW_COLUMN, SHARD_FAILED, *REPLY_COLUMNS])
    replies: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        replies.extend(batch.to_pylist())
    return replies


def run_planned(plan: EvaluationPlan, spec: EvaluateSpec) -> dict[str, Any]:
    """Generate, score, write; returns metrics.json's content."""
    from ..caption.watchdog import describe_abort

    started = time.time()
    try:
        replies = generate_replies(plan, spec)
    except Exception as exc:  # the model cannot load, nothing moves, …: say why in words
        raise describe_abort(exc, spec) from exc
    predictions, failed = score_replies(plan.benchmarks, replies, reply_column="caption", shard_column=SHARD_COLUMN,
                                        row_column=ROW_COLUMN, failed_column=SHARD_FAILED,
                                        expected={t.uri: t.rows for t in plan.tasks})
    metrics = evaluation_metrics(plan.benchmarks, predictions, model=spec.model, model_identity=plan.model.identity,
                                 run_id=plan.run_id, failed_shards={**plan.unusable, **failed},
                                 seconds=time.time() - started,
                                 extra={"spec": spec.model_dump(mode="json")})
    write_outputs(plan.storage, plan.output, predictions, metrics)
    log.info("evaluated %s on %d question rows in %.1f s", spec.model, len(predictions), metrics["seconds"])
    return metrics


def run_evaluation(spec: EvaluateSpec) -> dict[str, Any]:
    """Plan (fails fast on a bad spec), then evaluate. Ray must be up (or it starts locally)."""
    return run_planned(plan_evaluation(spec), spec)
