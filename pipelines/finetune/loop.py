"""The Ray Train worker loop: build the parts, then step until the run is done.

Each part is its own module beside it: data (plan + batches), model and parallelism
(parallel), the step (step), checkpoints (checkpointer) and metrics (metrics); rank 0
also feeds MLflow and TensorBoard (tracking). `config["hooks"]`
are callables run after each step (tests use them to record rows or to kill a worker); the
loop knows nothing of what they do. Each worker posts its stage (loading, waiting for data,
stepping, ...) to the driver's StageBoard, which says what a stalled run waits for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..specs import FinetuneSpec

from ..models import materialize_model
from ..storage import Storage
from .batches import BatchRecipe, TimedBatches
from .data import COUNTER_NAMES, RowFormat
from .plan import eval_plan, micro_batches_per_worker, worker_plan

# Step lines go through logging: in a Ray Train worker, print() is both logged and written
# to the forwarded stdout, so every printed line reached the driver twice.
logger = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What a hook sees after each optimizer step."""

    step: int
    epoch: int
    rank: int
    rows: list[int]  # global ids of the rows this worker trained on in the step
    run_dir: str


class TrainData:
    """A worker's micro-batches: the epoch plan, sliced past what a resumed run consumed."""

    def __init__(self, spec: FinetuneSpec, config: dict[str, Any], processor: Any, rank: int, world: int, device):
        fmt = RowFormat(spec.image_column, spec.conversations_column, spec.caption_column, spec.prompt,
                        spec.max_length, spec.length_policy)
        storage: Storage = config["storage"]
        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.train = BatchRecipe(config["train_index"], config["columns"], fmt, processor, storage)
        self.eval = BatchRecipe(config["eval_index"], config["eval_columns"], fmt, processor, storage) \
            if config.get("eval_index") else None

    def micro_per_epoch(self) -> int:
        s = self.spec
        return micro_batches_per_worker(self.train.index.num_rows, self.world, s.batch_size, s.grad_accum)

    def stream(self, epoch: int, skip_micro: int, micro_left: int) -> TimedBatches:
        """One pipeline for the rest of the run: the plans of this and the following epochs,
        past what was consumed, `micro_left` micro-batches long (one start-up, not one per epoch)."""
        s, plans, needed = self.spec, [], skip_micro + micro_left
        while needed > 0:
            plan = worker_plan(self.train.index, seed=s.seed, epoch=epoch + len(plans), rank=self.rank,
                               world=self.world, batch_size=s.batch_size, grad_accum=s.grad_accum,
                               shuffle_window=s.shuffle_window)
            plans.append(plan)
            needed -= len(plan)
        plan = np.concatenate(plans)[skip_micro:skip_micro + micro_left] if plans else np.zeros((0, s.batch_size))
        return TimedBatches(plan, self.train, self.device, tasks=s.data_tasks_per_worker)

    def evaluation(self) -> TimedBatches | None:
        if self.eval is None:
            return None
        plan = eval_plan(self.eval.index, rank=self.rank, world=self.world, batch_size=self.spec.batch_size,
                         max_batches=self.spec.eval_max_batches)
        return TimedBatches(plan, self.eval, self.device, tasks=self.spec.data_tasks_per_worker,
                            own_executor=False)


def _quiet_train_reports() -> None:
    """Ray Train 2.60 logs every report's metrics dict at INFO from a logger named by its
    file path, outside the `ray.train` tree that RunConfig's LoggingConfig filters: set
    that logger's level here, in the worker that reports. Its warnings still show."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from transformers.utils import logging as hf_logging

    from ..stall import StagePoster
    from ..storage import parse_uri
    from .tracking import Tracker
    from .checkpointer import Checkpointer
    from .export import export_run
    from .metrics import StepMeter, all_reduce, device_peak_flops, log_line, traversed_parameters
    from .parallel import TokenLossModule, freeze_unreachable_vision, load_for_stage, wrap
    from .step import autocast_for, eval_loss_sum, train_step
    from trol.training import cosine_with_warmup

    spec = FinetuneSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    total_steps: int = config["total_steps"]
    # The worker's bundle also holds its data tasks' CPUs, and Ray sizes a worker's thread
    # pool by the whole bundle: the step gets cpus_per_worker threads, the tasks the rest.
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    hf_logging.disable_progress_bar()  # a worker's stderr is a log, not a terminal
    _quiet_train_reports()
    stage = StagePoster(config["stage_board"], f"rank {rank}") if config.get("stage_board") else None

    def enter(name: str) -> None:
        if stage:
            stage.enter(name)

    # --- model and parallelism
    enter("loading the model")
    torch.manual_seed(spec.seed)  # adapters start identical on every worker
    model_path = materialize_model(config["model_ref"], config["storage"], spec.model_cache_dir)
    base, processor = load_for_stage(spec, model_path, device)
    torch.manual_seed(spec.seed + rank)  # while dropout differs per worker
    if spec.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.train()
    freeze_unreachable_vision(base, processor.image_size)
    module = TokenLossModule(base, processor.image_size)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    flops_per_token = 6 * traversed_parameters(base)
    model = wrap(module, spec, device)
    # --- optimizer and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = cosine_with_warmup(optimizer, spec.warmup_steps, total_steps)
    # --- checkpoints, data, metrics, trackers
    enter("restoring the checkpoint")
    checkpointer = Checkpointer(model, optimizer, scheduler, stage=spec.stage, trainable=trainable,
                                sharded=spec.strategy == "fsdp" and world > 1, rank=rank)
    # Measured before the restore: its random matrices would advance the generators a resumed
    # run has just set back, and the next dropout masks would differ from the uninterrupted run's.
    peak, peak_source = device_peak_flops(device)
    state = checkpointer.restore()
    data = TrainData(spec, config, processor, rank, world, device)
    meter = StepMeter(world, device, flops_per_token, peak)
    counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.long, device=device)
    autocast, normalize = autocast_for(spec, device), processor.normalize
    hooks = config.get("hooks") or []
    run_dir = parse_uri(config["run_dir"])
    tracked = spec.tracking.mlflow is not None or spec.tracking.tensorboard
    tracker = Tracker(spec, run_dir, config["storage"], {"total_steps": total_steps, "world_size": world}) \
        if rank == 0 and tracked else None
    last: dict[str, Any] = {}

    def log() -> None:
        nonlocal last
        entry = meter.flush(state.step, scheduler.get_last_lr()[0])
        if entry:
            state.tokens_seen += int(entry.pop("tokens"))
            state.train_seconds += entry["seconds"]
            state.data_wait_seconds += entry["seconds"] * entry["data_wait"]
            state.history.append(entry)
            last = entry
            if rank == 0:
                logger.info(log_line(entry, total_steps))
            if tracker:
                tracker.log(entry)

    def evaluate() -> float | None:
        batches = data.evaluation()
        if batches is None:
            return None
        enter("evaluating")
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        while (batch := batches.next()) is not None:
            loss, count = eval_loss_sum(model, batch, normalize, autocast)
            total += torch.stack([loss, count]).double()
        model.train()
        loss, count = all_reduce(total.tolist())
        return loss / count if count else None

    def checkpoint(final: bool = False) -> dict[str, Any]:
        log()
        eval_loss = evaluate()
        if eval_loss is not None and state.history:
            state.history[-1]["eval_loss"] = eval_loss
        if tracker and eval_loss is not None:
            tracker.log_eval(eval_loss, state.step)
        totals = all_reduce(counters.double().tolist())
        counters.zero_()
        state.data = {k: state.data.get(k, 0) + int(v) for k, v in zip(COUNTER_NAMES, totals)}
        metrics = {**last, "step": state.step, "epoch": state.epoch, "eval_loss": eval_loss, **state.data}
        if final:  # the summary rides on the last checkpoint's metrics back to the driver
            enter("exporting the model")
            metrics["summary"] = export_run(model, checkpointer, processor, spec, config, state, dict(metrics), model_path,
                                            peak_source=peak_source, flops_per_token=flops_per_token)
        enter("checkpointing")
        checkpointer.save(state, metrics)
        if tracker:
            tracker.flush()
        return metrics

    def finished() -> bool:
        # epochs: the step count is only the schedule's estimate; max_steps: it is the limit.
        return state.epoch >= spec.epochs if spec.epochs else state.step >= total_steps

    try:
        per_epoch = data.micro_per_epoch()
        micro_left = (spec.epochs - state.epoch) * per_epoch - state.micro_in_epoch if spec.epochs \
            else (total_steps - state.step) * spec.grad_accum
        enter("starting the data pipeline")
        batches = data.stream(state.epoch, state.micro_in_epoch, max(0, micro_left))
        while not finished():
            started, waited, starting = time.perf_counter(), batches.wait_seconds, batches.startup_seconds
            enter("waiting for data")
            micro = [b for b in (batches.next() for _ in range(spec.grad_accum)) if b is not None]
            if len(micro) < spec.grad_accum:
                raise RuntimeError(f"the data stream ended early at step {state.step} "
                                   f"(planned {micro_left} more micro-batches)")
            enter("stepping")
            result = train_step(model, micro, optimizer, scheduler, params, max_grad_norm=spec.max_grad_norm,
                                normalize=normalize, autocast=autocast)
            for batch in micro:
                counters += batch["counters"]
            step_epoch = state.epoch
            state.step += 1
            if stage:
                stage.advance()
            state.micro_in_epoch += len(micro)
            if state.micro_in_epoch == per_epoch:  # epochs hold whole steps: a step never straddles two
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
            startup = batches.startup_seconds - starting  # the pipeline's start, apart from steady state
            state.data_startup_seconds += startup
            meter.add_step(result.loss_sum, result.label_tokens, result.tokens,
                           time.perf_counter() - started - startup, batches.wait_seconds - waited)
            if hooks:
                rows = np.concatenate([b["rows"].cpu().numpy() for b in micro])
                info = StepInfo(state.step, step_epoch, rank, rows[rows >= 0].tolist(), config["run_dir"])
                for hook in hooks:
                    hook(info)
            if finished():
                break
            if state.step % spec.checkpoint_every == 0:
                checkpoint()
            elif state.step % spec.log_every == 0:
                log()
        metrics = checkpoint(final=True)  # also on a rerun of a finished run: the export and summary are redone
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    finally:
        if stage:
            stage.close()
    if tracker:
        curve = run_dir.join("loss_curve.png")
        storage = config["storage"]
        tracker.finish(metrics["summary"], storage.read_bytes(curve) if storage.exists(curve) else None)
