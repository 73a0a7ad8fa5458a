"""`python -m jobs.evaluate SPEC.yaml`: the spec. Shared pieces come from pipelines.specs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..storage.images import DEFAULT_MAX_PIXELS
from ..specs import StorageSpec, _Spec, check_bitsandbytes, check_concurrency, not_blank
from .benchmark_spec import BenchmarkSpec, check_unique_names


class EvaluateSpec(_Spec):
    """Score a model on one or more benchmarks; generation runs on Ray like captioning."""

    benchmarks: list[BenchmarkSpec] = Field(..., min_length=1, description="each with name, data, kind and options")
    model: str = Field(..., description=(
        "TroL folder (local or s3://), hub id, or a released checkpoint (BK-Lee/TroL-1.8B|3.8B|7B or its folder)"))
    output: str = Field(..., description="folder/prefix for predictions.parquet, metrics.json and metrics.md")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="tokens generated per answer (greedy)")
    batch_size: int = Field(16, ge=1, le=4096, description="questions per generate() call")
    concurrency: int | tuple[int, int] = Field(
        1, description="predictor actors (model copies): n, or [min, max] for a pool that grows with the cluster")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="0 runs the model on CPU")
    cpus_per_actor: float = Field(1.0, gt=0.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal[4, 8] | None = Field(None, description="4 or 8: bitsandbytes LLM weights (CUDA GPUs or CPU)")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images become row errors")
    model_cache_dir: str | None = Field(None, description="where s3:// or released models are cached per node")
    stall_timeout_s: float = Field(
        1800.0, gt=0.0, description="no-progress watchdog: when nothing moves through the pipeline this long (e.g. "
        "actors wait for GPUs the cluster never offers), the run ends (exit 3) saying what it waited for")
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: int | None) -> int | None:
        return check_bitsandbytes(v)

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        return check_concurrency(v)

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, v: list[BenchmarkSpec]) -> list[BenchmarkSpec]:
        return check_unique_names(v)

    @field_validator("model", "output")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        return not_blank(v)

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if any(c in v for c in "*?["):
            raise ValueError("must be a folder or prefix, not a glob")
        return v
