"""The Ray Train worker loop: build the parts, then step until the run is done.

Each part is its own module: data (train_plan + train_batches), model and parallelism
(train_parallel), the step (train_step), checkpoints (train_checkpointer) and metrics
(train_metrics). `config["hooks"]` are callables run after each step (tests use them to
record rows or to kill a worker); the loop knows nothing of what they do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .specs import FinetuneSpec

from .models import materialize_model
from .storage import Storage
from .train_batches import BatchRecipe, TimedBatches
from .train_data import COUNTER_NAMES, RowFormat
from .train_plan import eval_plan, micro_batches_per_worker, worker_plan


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
        return TimedBatches(plan, self.train, self.device, cpus_per_task=s.data_cpus_per_task)

    def evaluation(self) -> TimedBatches | None:
        if self.eval is None:
            return None
        plan = eval_plan(self.eval.index, rank=self.rank, world=self.world, batch_size=self.spec.batch_size,
                         max_batches=self.spec.eval_max_batches)
        return TimedBatches(plan, self.eval, self.device, cpus_per_task=self.spec.data_cpus_per_task,
                            own_executor=False)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from .train_checkpointer import Checkpointer
    from .train_export import export_run
    from .train_metrics import StepMeter, all_reduce, device_peak_flops, log_line, traversed_parameters
    from .train_parallel import TokenLossModule, freeze_unreachable_vision, load_for_stage, wrap
    from .train_step import autocast_for, eval_loss_sum, train_step
    from trol.training import cosine_with_warmup

    spec = FinetuneSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    total_steps: int = config["total_steps"]

    # --- model and parallelism
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
    # --- checkpoints, data, metrics
    checkpointer = Checkpointer(model, optimizer, scheduler, stage=spec.stage, trainable=trainable,
                                sharded=spec.strategy == "fsdp" and world > 1, rank=rank)
    state = checkpointer.restore()
    data = TrainData(spec, config, processor, rank, world, device)
    peak, peak_source = device_peak_flops(device)
    meter = StepMeter(world, device, flops_per_token, peak)
    counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.long, device=device)
    autocast, normalize = autocast_for(spec, device), processor.normalize
    hooks = config.get("hooks") or []
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
                print(log_line(entry, total_steps), flush=True)

    def evaluate() -> float | None:
        batches = data.evaluation()
        if batches is None:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        while (batch := batches.next()) is not None:
            loss, count = eval_loss_sum(model, batch, normalize, autocast)
            total += torch.stack([loss, count]).double()
        model.train()
        loss, count = all_reduce(total.tolist())
        return loss / count if count else None

    def checkpoint(final: bool = False) -> None:
        log()
        eval_loss = evaluate()
        if eval_loss is not None and state.history:
            state.history[-1]["eval_loss"] = eval_loss
        totals = all_reduce(counters.double().tolist())
        counters.zero_()
        state.data = {k: state.data.get(k, 0) + int(v) for k, v in zip(COUNTER_NAMES, totals)}
        metrics = {**last, "step": state.step, "epoch": state.epoch, "eval_loss": eval_loss, **state.data}
        if final:  # the summary rides on the last checkpoint's metrics back to the driver
            metrics["summary"] = export_run(model, checkpointer, processor, spec, config, state, dict(metrics), model_path,
                                            peak_source=peak_source, flops_per_token=flops_per_token)
        checkpointer.save(state, metrics)

    def finished() -> bool:
        # epochs: the step count is only the schedule's estimate; max_steps: it is the limit.
        return state.epoch >= spec.epochs if spec.epochs else state.step >= total_steps

    per_epoch = data.micro_per_epoch()
    micro_left = (spec.epochs - state.epoch) * per_epoch - state.micro_in_epoch if spec.epochs \
        else (total_steps - state.step) * spec.grad_accum
    batches = data.stream(state.epoch, state.micro_in_epoch, max(0, micro_left))
    while not finished():
        started, waited, starting = time.perf_counter(), batches.wait_seconds, batches.startup_seconds
        micro = [b for b in (batches.next() for _ in range(spec.grad_accum)) if b is not None]
        if len(micro) < spec.grad_accum:
            raise RuntimeError(f"the data stream ended early at step {state.step} (planned {micro_left} more micro-batches)")
        result = train_step(model, micro, optimizer, scheduler, params, max_grad_norm=spec.max_grad_norm,
                            normalize=normalize, autocast=autocast)
        for batch in micro:
            counters += batch["counters"]
        step_epoch = state.epoch
        state.step += 1
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
    checkpoint(final=True)  # also on a rerun of a finished run: the export and summary are redone
