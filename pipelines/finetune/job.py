"""Fine-tuning with Ray Train: the driver (validate → plan → TorchTrainer) and its summary.

The worker loop is `loop`; the package's other modules hold its parts (see the package
docstring). A run that stops progressing says what it waits for: pipelines.stall.

Each worker's placement-group bundle holds its own CPUs and those of its Ray Data tasks
(cpus_per_worker + data_tasks_per_worker x data_cpus_per_task), reserved together, so
nothing else on the cluster can take the CPUs the workers' data needs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..specs import FinetuneSpec, SpecError

from ..evaluate.after_training import check_evaluation, evaluate_after_training
from ..models import resolve_model_ref
from ..storage.shards import find_shards
from ..stall import BoardReader, StageBoard, StallWatch
from ..storage import Location, Storage, StorageError, parse_uri
from .tracking import check_tracking_installed
from .plan import RowIndex, micro_batches_per_worker
from .runs import check_nodes, check_resumable, cluster_node_count

# Ray Train's INFO lines (worker group started, each report's metrics) are for debugging
# Ray Train itself; the run's own lines say what happens. Its warnings and errors still show.
RAY_TRAIN_LOG_LEVEL = "WARNING"
# The workers' environment (a user's own setting in the driver's environment wins):
# - Ray Data logs each pipeline's start, plan and end at INFO, one set per worker per epoch
#   and evaluation; its warnings and errors still show.
# - Ray Train 2.60 patches print() in workers to log the line *and* write it to the
#   forwarded stdout, so every print reached the console twice.
WORKER_ENV_DEFAULTS = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
DEFAULT_STALL_AFTER_S = 300.0


@dataclass(frozen=True)
class _Source:
    """Checked training (or eval) shards: their row index and the columns to read."""

    index: RowIndex
    columns: list[str]

    @property
    def rows(self) -> int:
        return self.index.num_rows


def _check_data(uri: str, field: str, spec: FinetuneSpec, storage: Storage) -> _Source:
    try:
        _, shards, _ = find_shards(uri, storage)
        if not shards:
            raise StorageError(f"no .parquet shards at {uri}")
        metas = [storage.parquet_metadata(s) for s in shards]  # footers only: row counts + schema
    except StorageError as exc:
        raise SpecError(field, str(exc)) from None
    names = set(metas[0].schema.to_arrow_schema().names)
    if spec.conversations_column not in names and spec.caption_column not in names:
        raise SpecError(field, f"shards have neither {spec.conversations_column!r} (conversations_column) nor "
                        f"{spec.caption_column!r} (caption_column); columns are {sorted(names)}")
    if spec.image_column not in names:
        raise SpecError("image_column", f"{spec.image_column!r} is not a column of {shards[0].uri}; "
                        f"columns are {sorted(names)}")
    index = RowIndex(tuple(s.uri for s in shards),
                     tuple(tuple(m.row_group(g).num_rows for g in range(m.num_row_groups)) for m in metas))
    if index.num_rows == 0:
        raise SpecError(field, f"{uri} holds no rows")
    wanted = [spec.image_column, spec.conversations_column, spec.caption_column]
    return _Source(index, [c for c in wanted if c in names])


def plan_steps(spec: FinetuneSpec, train_rows: int) -> int:
    """Optimizer steps for the whole run: the limit for max_steps runs, an upper estimate
    (the cosine schedule's length) for epoch runs, which end when their epochs do."""
    if spec.max_steps:
        return spec.max_steps
    micro = micro_batches_per_worker(train_rows, spec.workers, spec.batch_size, spec.grad_accum)
    return spec.epochs * max(1, micro // spec.grad_accum)


def _has_checkpoint(storage: Storage, run_dir: Location) -> bool:
    try:
        return storage.is_dir(run_dir) and any(
            "/checkpoint_" in f.path[len(run_dir.path):] for f in storage.list_files(run_dir))
    except StorageError:
        return False


def _record_spec(spec: FinetuneSpec, storage: Storage, run_dir: Location) -> None:
    """Store the spec; on a rerun with checkpoints, first check it may resume them."""
    spec_file = run_dir.join("_SPEC.json")
    try:
        if _has_checkpoint(storage, run_dir) and storage.exists(spec_file):
            check_resumable(storage.read_json(spec_file), spec)
        storage.write_json(spec_file, spec.model_dump(mode="json"))
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None


def worker_resources(spec: FinetuneSpec) -> dict[str, float]:
    """One worker's placement-group bundle: its own CPUs plus its data tasks' (and its GPU)."""
    cpus = spec.cpus_per_worker + spec.data_tasks_per_worker * spec.data_cpus_per_task
    return {"CPU": cpus, **({"GPU": 1} if spec.gpus_per_worker else {})}


def run_finetune(spec: FinetuneSpec, hooks: list | None = None,
                 stall_after_s: float = DEFAULT_STALL_AFTER_S) -> dict[str, Any]:
    """Validate (before any model loads), then train; returns the run's summary.

    `hooks` run on every worker after each step with a loop.StepInfo (tests record
    rows or inject faults through them). After `stall_after_s` seconds without a step, the
    driver logs what the run waits for (each worker's stage, Ray's pending demands)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .loop import train_loop

    check_tracking_installed(spec.tracking)
    try:
        storage = Storage.from_environment(spec.storage.endpoint_url, spec.storage.region)
        ref = resolve_model_ref(spec.base_model, storage)
    except StorageError as exc:
        raise SpecError("base_model", str(exc)) from None
    train = _check_data(spec.data, "data", spec, storage)
    evaluation = _check_data(spec.eval_data, "eval_data", spec, storage) if spec.eval_data else None
    nodes = cluster_node_count()
    check_nodes(spec, nodes, base_model_is_local=ref.kind == "local")
    check_evaluation(spec, storage, nodes)
    run_dir = parse_uri(spec.output).join(spec.name)
    _record_spec(spec, storage, run_dir)
    total_steps = plan_steps(spec, train.rows)
    out_fs = storage.filesystem(run_dir)
    board = ray.remote(num_cpus=0)(StageBoard).remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "storage": storage,
            "model_ref": ref,
            "total_steps": total_steps,
            "run_dir": run_dir.uri,
            "train_index": train.index,
            "columns": train.columns,
            "eval_index": evaluation.index if evaluation else None,
            "eval_columns": evaluation.columns if evaluation else None,
            "hooks": list(hooks or []),
            "stage_board": board,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.workers,
            use_gpu=spec.gpus_per_worker > 0,
            resources_per_worker=worker_resources(spec),
        ),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=parse_uri(spec.output).path,
            storage_filesystem=out_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=RAY_TRAIN_LOG_LEVEL),
            worker_runtime_env={"env_vars": {k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}},
        ),
    )
    started = time.perf_counter()
    reader = BoardReader(board)
    watch = StallWatch(f"finetune {spec.name}", stall_after_s, counter=reader.count,
                       stages=lambda: reader.stages() or {"workers": "not started (Ray Train places the worker group)"})
    try:
        with watch:
            result = trainer.fit()
    finally:
        ray.kill(board)
    if result.error:
        raise result.error
    # The summary comes back through Ray (rank 0's last report): no shared disk needed.
    summary = dict(result.metrics["summary"])
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    if spec.evaluate is not None:
        summary = evaluate_after_training(spec, summary, storage)
    return summary


def format_finetune_summary(summary: dict[str, Any]) -> str:
    last = summary.get("final_metrics", {})
    lines = [
        f"fine-tuned {summary['name']}: {summary['steps']} steps, stage {summary['stage']}, {summary['workers']} workers",
        f"  final loss {last.get('loss', float('nan')):.4f}"
        + (f", eval loss {last['eval_loss']:.4f}" if last.get("eval_loss") is not None else ""),
        f"  {summary['mean_tokens_per_s']:.0f} tokens/s over {summary['train_seconds']} s of steps "
        f"({summary['tokens_seen']} tokens), {summary.get('wall_seconds', 0)} s wall",
        f"  data wait {100 * summary.get('data_wait_fraction', 0.0):.1f}% of step time, MFU "
        + (f"{100 * summary['mean_mfu']:.2f}%" if summary.get("mean_mfu") is not None else "n/a")
        + f" (peak: {summary.get('peak_flops_source', '?')})",
        f"  model: {summary['model']}",
        f"  loss curve: {summary['loss_curve']}",
    ]
    if summary.get("resumed_from"):
        lines.append(f"  resumed from step(s) {summary['resumed_from']}")
    return "\n".join(lines)
