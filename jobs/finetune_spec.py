"""FinetuneSpec: `python -m jobs.finetune SPEC.yaml`. Defaults are visible here, in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .specs import StorageSpec, _Spec


class LoraSpec(_Spec):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="None: the LLM family's attention + MLP projections")


class FinetuneSpec(_Spec):
    """Fine-tune a TroL model with Ray Train (TorchTrainer)."""

    data: str = Field(..., description="Parquet shards (folder/prefix, file or glob; s3:// or local)")
    eval_data: str | None = Field(None, description="held-out Parquet shards; eval loss at each checkpoint")
    output: str = Field(..., description="RunConfig storage_path: checkpoints and the final model go under output/name")
    name: str = Field(..., description="run name; rerunning the same output + name resumes")
    base_model: str = Field(..., description="TroL model folder, s3:// folder or hub id")
    stage: Literal["1", "2", "full"] = Field(
        "1", description="1: projector + mixers; 2: 1 + LoRA on the LLM; full: everything")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantize: Literal[4] | None = Field(None, description="4: QLoRA (stage 2, CUDA + bitsandbytes)")
    keep_adapter: bool = Field(False, description="stage 2: save the LoRA adapter beside the base instead of merging")
    workers: int = Field(1, ge=1)
    gpus_per_worker: int = Field(0, ge=0, le=1, description="0: CPU training (gloo); 1: one GPU per worker (nccl)")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    batch_size: int = Field(8, ge=1, description="rows per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and metric reports)")
    log_every: int = Field(10, ge=1, description="steps between loss-curve points and log lines")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1: unlimited")
    seed: int = 0
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 autocast on GPU")
    image_column: str = "image"
    conversations_column: str = "conversations"
    caption_column: str = "caption"
    prompt: str = Field("Describe the image.", description="user turn for rows that only have a caption")
    max_length: int = Field(2048, ge=8)
    length_policy: Literal["truncate", "drop"] = "truncate"
    eval_max_batches: int = Field(20, ge=1)
    model_cache_dir: str | None = None
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("stage", mode="before")
    @classmethod
    def _stage(cls, v):
        return str(v) if isinstance(v, int) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.strip() != v:
            raise ValueError("must be a non-empty name without '/' or surrounding spaces")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSpec:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps or epochs")
        if self.quantize and self.stage != "2":
            raise ValueError("quantize: 4 (QLoRA) goes with stage: 2")
        if self.keep_adapter and self.stage != "2":
            raise ValueError("keep_adapter only applies to stage: 2 (LoRA)")
        if self.quantize and self.gpus_per_worker == 0:
            raise ValueError("quantize: 4 needs gpus_per_worker: 1 (bitsandbytes runs on CUDA)")
        return self
