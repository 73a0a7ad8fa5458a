"""Fine-tuning a TroL with Ray Train (DDP or FSDP, CPU or GPU workers), resumable.

- `job`: the driver: validate the spec, plan, start the TorchTrainer, summarise
  (`run_finetune`, `format_finetune_summary`, `worker_resources`).
- `runs`: driver-side rules: several nodes and shared paths, what a resume may change.
- `loop`: the per-worker training loop; its parts live beside it:
  `plan` (which rows each worker reads, per epoch), `data` (a row → tokens and pixels),
  `batches` (micro-batches made by Ray Data tasks), `parallel` (model loading per stage,
  DDP/FSDP wrapping), `step` (one optimizer step with gradient accumulation),
  `checkpoint` and `checkpointer` (what a checkpoint holds; when to write and keep them),
  `metrics` (tokens/s, MFU, data wait), `export` (the final model folder),
  `tracking` (MLflow and TensorBoard on rank 0).
"""

from .job import format_finetune_summary, run_finetune, worker_resources

__all__ = ["format_finetune_summary", "run_finetune", "worker_resources"]
