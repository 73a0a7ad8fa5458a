"""Fine-tuning with Ray Train: the driver (validate → datasets → TorchTrainer) and the loop.

The loop stays short because its parts live elsewhere: what trains (trol.training), data
(train_data), checkpoint files and export (train_checkpoint), storage (storage).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any


from pipelines.specs import FinetuneSpec, SpecError

from .predictor import materialize_model, resolve_model_ref
from .shards import find_shards
from .storage import Location, Storage, StorageError, parse_uri
from .train_checkpoint import (ADAPTER_DIR, TrainState, export_model, load_checkpoint, save_checkpoint,
                               write_loss_curve)
from .train_data import COUNTER_NAMES, DataCounters, RowFormat, arrow_rows, model_batches
from .train_metrics import StepMeter, all_reduce

MODEL_SUBDIR = "model"
# Test hook: kill one worker once at this step (see tests/test_finetune.py).
FAULT_ENV = "TROL_FAULT_AT_STEP"


# --- driver -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Checked training (or eval) shards: where they are, how many rows, what to read."""

    shards: list[Location]
    rows: int
    columns: list[str]


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
    rows = sum(m.num_rows for m in metas)
    if rows == 0:
        raise SpecError(field, f"{uri} holds no rows")
    wanted = [spec.image_column, spec.conversations_column, spec.caption_column]
    return _Source(shards, rows, [c for c in wanted if c in names])


def plan_steps(spec: FinetuneSpec, train_rows: int) -> int:
    """Optimizer steps for the whole run: the limit for max_steps runs, an upper estimate
    (the cosine schedule's length) for epoch runs, which end when their epochs do."""
    if spec.max_steps:
        return spec.max_steps
    per_step = spec.batch_size * spec.workers * spec.grad_accum
    return spec.epochs * max(1, math.ceil(train_rows / per_step))


def _read(source: _Source, storage: Storage):
    import ray.data

    fs = storage.filesystem(source.shards[0])
    return ray.data.read_parquet([s.path for s in source.shards], filesystem=fs).select_columns(source.columns)


def run_finetune(spec: FinetuneSpec) -> dict[str, Any]:
    """Validate (before any model loads), then train; returns the final metrics and paths."""
    import ray.train
    from ray.train.torch import TorchTrainer

    try:
        storage = Storage.from_environment(spec.storage.endpoint_url, spec.storage.region)
        ref = resolve_model_ref(spec.base_model, storage)
    except StorageError as exc:
        raise SpecError("base_model", str(exc)) from None
    train = _check_data(spec.data, "data", spec, storage)
    evaluation = _check_data(spec.eval_data, "eval_data", spec, storage) if spec.eval_data else None
    if spec.strategy == "fsdp" and spec.gpus_per_worker == 0:
        raise SpecError("strategy", "fsdp shards parameters across GPUs; use strategy: ddp on CPU workers")
    run_dir = parse_uri(spec.output).join(spec.name)
    try:
        storage.write_json(run_dir.join("_SPEC.json"), spec.model_dump(mode="json"))
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None

    datasets = {"train": _read(train, storage)}
    if evaluation:
        datasets["eval"] = _read(evaluation, storage)
    total_steps = plan_steps(spec, train.rows)
    out_fs = storage.filesystem(run_dir)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "storage": storage,
            "model_ref": ref,
            "total_steps": total_steps,
            "run_dir": run_dir.uri,
            "fault_at_step": int(os.environ.get(FAULT_ENV, "0")),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.workers,
            use_gpu=spec.gpus_per_worker > 0,
            resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=parse_uri(spec.output).path,
            storage_filesystem=out_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
        ),
        datasets=datasets,
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    summary = storage.read_json(run_dir.join("training_summary.json"))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def format_finetune_summary(summary: dict[str, Any]) -> str:
    last = summary.get("final_metrics", {})
    lines = [
        f"fine-tuned {summary['name']}: {summary['steps']} steps, stage {summary['stage']}, {summary['workers']} workers",
        f"  final loss {last.get('loss', float('nan')):.4f}"
        + (f", eval loss {last['eval_loss']:.4f}" if last.get("eval_loss") is not None else ""),
        f"  {summary['mean_tokens_per_s']:.0f} tokens/s over {summary['train_seconds']} s of steps "
        f"({summary['tokens_seen']} tokens), {summary.get('wall_seconds', 0)} s wall",
        f"  model: {summary['model']}",
        f"  loss curve: {summary['loss_curve']}",
    ]
    if summary.get("resumed_from"):
        lines.append(f"  resumed from step(s) {summary['resumed_from']}")
    return "\n".join(lines)


# --- worker loop --------------------------------------------------------------------------

def _autocast(spec: FinetuneSpec, device):
    import torch

    if device.type == "cuda" and spec.dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if spec.dtype == "bfloat16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build_model(spec: FinetuneSpec, path: str, quantize: bool = True):
    import torch

    from trol import TroLForConditionalGeneration, TroLProcessor
    from trol.training import LoraSettings, prepare_for_stage, quantization_config

    from trol.training import apply_saved_adapter

    bits = spec.quantize if quantize else None
    model = TroLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, quantization_config=quantization_config(bits))
    adapter = os.path.join(path, ADAPTER_DIR)
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):  # a keep_adapter export as base
        if bits:
            raise ValueError(f"{path} keeps a LoRA adapter beside its base; a 4-bit base cannot absorb it. "
                             "Export that run with keep_adapter: false, then use it as base_model")
        apply_saved_adapter(model, adapter)
    lora = LoraSettings(**spec.lora.model_dump())
    prepare_for_stage(model, spec.stage, lora)
    return model, TroLProcessor.from_pretrained(path)


def _strategy_kwargs(spec: FinetuneSpec, device) -> dict[str, Any]:
    if spec.strategy == "ddp":
        # Rows without an image leave the vision side unused in that step.
        return {"find_unused_parameters": True}
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from trol import TroLDecoderLayer

    # One FSDP unit per traversed decoder layer; the vision side stays in the root unit, so a
    # rank whose batch has no image still joins every all-gather. use_orig_params allows
    # frozen and trainable parameters in one unit (stages 1 and 2).
    return {
        "auto_wrap_policy": functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={TroLDecoderLayer}),
        "use_orig_params": True,
        "device_id": device,
    }


def _trained_state(model, spec: FinetuneSpec, trainable: set[str]) -> dict:
    """What a checkpoint must hold: everything for stage "full"; for stages 1 and 2 only
    the trained parameters (the frozen base is base_model itself, even when 4-bit)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if spec.stage == "full" else {k: v for k, v in state.items() if k in trainable}


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    from trol.training import cosine_with_warmup

    spec = FinetuneSpec.model_validate(config["spec"])
    storage: Storage = config["storage"]
    total_steps: int = config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed)  # adapters start identical on every worker

    model_path = materialize_model(config["model_ref"], storage, spec.model_cache_dir)
    model, processor = _build_model(spec, model_path)
    torch.manual_seed(spec.seed + rank)  # while dropout differs per worker
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model = ray.train.torch.prepare_model(model, parallel_strategy=spec.strategy,
                                          parallel_strategy_kwargs=_strategy_kwargs(spec, device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = cosine_with_warmup(optimizer, spec.warmup_steps, total_steps)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            model_state, optim_state, sched_state, state = load_checkpoint(directory)
        set_model_state_dict(model, model_state,
                             options=StateDictOptions(full_state_dict=True, strict=spec.stage == "full"))
        # Parameters that never got a gradient (e.g. vision layers after the feature layer)
        # have no optimizer state yet; they simply start fresh, as they would have.
        set_optimizer_state_dict(model, optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        scheduler.load_state_dict(sched_state)
        state.resumed_from.append(state.step)

    fmt = RowFormat(spec.image_column, spec.conversations_column, spec.caption_column, spec.prompt,
                    spec.max_length, spec.length_policy)
    counters = DataCounters()
    if rank == 0:  # a resumed run keeps counting from its checkpoint (summed once, not per worker)
        counters.counts.update(state.data)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if spec.eval_data else None

    def batches(shard, epoch: int):
        """Training batches of one epoch, or (epoch < 0) evaluation batches, counted apart."""
        raw = shard.iter_batches(batch_size=spec.batch_size, batch_format="pyarrow",
                                 local_shuffle_buffer_size=None if epoch < 0 else spec.batch_size * 8,
                                 local_shuffle_seed=None if epoch < 0 else spec.seed + 1000 * epoch + rank)
        counted = counters if epoch >= 0 else DataCounters()
        for batch in model_batches(arrow_rows(raw), processor, fmt, spec.batch_size, counted, storage):
            yield {k: v.to(device) for k, v in batch.items()}

    def evaluate() -> float | None:
        if eval_shard is None:
            return None
        model.eval()
        total, count, it = 0.0, 0, iter(batches(eval_shard, -1))
        with torch.no_grad(), _autocast(spec, device):
            for _ in range(spec.eval_max_batches):
                batch = next(it, None)
                if all_reduce([1.0 if batch else 0.0], "min")[0] == 0:  # every worker steps together
                    break
                total += model(**batch, use_cache=False).loss.item()
                count += 1
        model.train()
        total, count = all_reduce([total, float(count)])
        return total / count if count else None

    meter = StepMeter(world)
    last: dict[str, Any] = {}
    exported = False

    def log_point() -> None:
        nonlocal last
        entry = meter.flush(state.step, scheduler.get_last_lr()[0])
        if entry:
            state.tokens_seen += int(entry.pop("tokens"))
            state.train_seconds += entry.pop("seconds")
            last = entry
            state.history.append(entry)
            if rank == 0:
                print(f"step {entry['step']}/{total_steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                      f"{entry['tokens_per_s']:.0f} tok/s {entry['step_time_s']:.3f} s/step", flush=True)

    def checkpoint_and_report(final: bool = False) -> None:
        nonlocal exported
        log_point()
        eval_loss = evaluate()
        if eval_loss is not None and state.history:
            state.history[-1]["eval_loss"] = eval_loss
        state.data = {k: int(v) for k, v in zip(COUNTER_NAMES, all_reduce(counters.values()))}
        metrics = {**last, "step": state.step, "epoch": state.epoch, "eval_loss": eval_loss, **state.data}
        full_state = _trained_state(model, spec, trainable)
        optim_state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_checkpoint(directory, full_state, optim_state, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics)
        if final:
            exported = True
            _export(model, full_state, processor, spec, storage, config, state, metrics, model_path)

    def finished() -> bool:
        # epochs: the step count is only the schedule's estimate; max_steps: it is the limit.
        return state.epoch >= spec.epochs if spec.epochs else state.step >= total_steps

    done = finished()
    while not done:
        it = iter(batches(train_shard, state.epoch))
        for _ in range(state.batches_in_epoch):  # resume inside an epoch: skip what was trained
            next(it, None)
        while True:
            started = time.perf_counter()
            micro = [b for b in (next(it, None) for _ in range(spec.grad_accum)) if b is not None]
            if all_reduce([1.0 if len(micro) == spec.grad_accum else 0.0], "min")[0] == 0:
                break  # some worker ran out of rows: the epoch ends for all together
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(spec, device):
                    loss = model(**batch).loss
                (loss / spec.grad_accum).backward()
                meter.add_micro_batch(loss.item(), int(batch["attention_mask"].sum()))
            if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over all shards, not this rank's
                model.clip_grad_norm_(spec.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batches_in_epoch += spec.grad_accum
            meter.add_step(time.perf_counter() - started)
            if config["fault_at_step"] == state.step and rank == world - 1:
                _inject_fault(config)
            done = not spec.epochs and state.step >= total_steps
            if done or state.step % spec.checkpoint_every == 0:
                checkpoint_and_report(final=done)
            elif state.step % spec.log_every == 0:
                log_point()
            if done:
                break
        if state.batches_in_epoch == 0 and not done:
            raise RuntimeError("no usable training rows: every row was dropped (see the data counters)")
        state.epoch += 1
        state.batches_in_epoch = 0
        if not done and finished():
            done = True
            checkpoint_and_report(final=True)
    if not exported:
        # A rerun of a finished run (or one that stopped after its last checkpoint): the
        # loop had nothing left to do, but the final folder must still exist.
        _export(model, _trained_state(model, spec, trainable), processor, spec, storage, config, state, {}, model_path)


def _inject_fault(config: dict[str, Any]) -> None:
    """Kill this worker process once (a marker file makes the restarted run go on).

    Ray Train's controller registers a reported checkpoint when it next polls the workers;
    the pause lets it see the last one, so the test checks restarting, not that race."""
    marker = os.path.join(tempfile.gettempdir(), f"trol-fault-{os.path.basename(config['run_dir'])}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(2.0)
        os._exit(1)


def _export(model, full_state, processor, spec: FinetuneSpec, storage: Storage, config: dict[str, Any],
            state: TrainState, metrics: dict[str, Any], model_path: str) -> None:
    """Rank 0 writes the final TroL folder, loss curve and summary under output/name/."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return
    # The full-precision base (with adapters for stage 2) plus what was trained is the model;
    # under QLoRA the 4-bit copy of the base was only a stand-in for it.
    plain, _ = _build_model(spec, model_path, quantize=False)
    result = plain.load_state_dict(full_state, strict=spec.stage == "full")
    if result.unexpected_keys:
        raise ValueError(f"trained weights do not fit the base model: {sorted(result.unexpected_keys)[:3]}")
    run_dir = parse_uri(config["run_dir"])
    with tempfile.TemporaryDirectory() as directory:
        model_dir = os.path.join(directory, MODEL_SUBDIR)
        export_model(plain, processor, model_dir, keep_adapter=spec.keep_adapter)
        curve = os.path.join(directory, "loss_curve.png")
        write_loss_curve(state.history, curve, f"{spec.name}: stage {spec.stage}")
        for root, _, files in os.walk(directory):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
                with open(os.path.join(root, name), "rb") as f:
                    storage.write_bytes(run_dir.join(rel), f.read())
    storage.write_json(run_dir.join("training_summary.json"), {
        "name": spec.name, "stage": spec.stage, "workers": spec.workers, "steps": state.step,
        "epochs": state.epoch,  # completed epochs
        "model": run_dir.join(MODEL_SUBDIR).uri,
        "loss_curve": run_dir.join("loss_curve.png").uri, "final_metrics": metrics,
        "history": state.history, "resumed_from": state.resumed_from, "data": state.data,
        "tokens_seen": state.tokens_seen, "train_seconds": round(state.train_seconds, 1),
        "mean_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
    })
