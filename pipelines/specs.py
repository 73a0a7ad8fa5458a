"""Job specs: YAML in, validated pydantic objects out, errors that name the field.

Shared pieces first (SpecError, the `_Spec` base, StorageSpec, YAML loading and `--set`
overrides), then the caption job's spec; other jobs' specs build on the same pieces.
Defaults are visible next to each field.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .evaluate.benchmark_spec import EvaluateAfterTraining
from .storage.images import DEFAULT_MAX_PIXELS

# Keys that look like credentials: rejected with a pointer to the AWS variables, and their
# values are never echoed (pydantic's default message would print the input value).
_SECRET_KEY = re.compile(r"(secret|password|token|access_key|credential)", re.IGNORECASE)


class SpecError(Exception):
    """A spec that cannot work. `field` is the dotted name of the field to fix."""

    def __init__(self, field: str, message: str, *, text: str | None = None):
        # `text` lets one error report several fields while `field` names the first.
        super().__init__(text or (f"{field}: {message}" if field else message))
        self.field = field
        self.message = message


class _Spec(BaseModel):
    """Base of every spec: unknown fields are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSpec(_Spec):
    """Where S3 lives. Credentials are NOT here: they come from AWS_* variables or profiles."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:9000; None: AWS")
    region: str | None = Field(None, description="None: AWS_REGION / AWS_DEFAULT_REGION / profile / us-east-1")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if _SECRET_KEY.search(str(key)):
                    raise ValueError(
                        f"{key!r} is not accepted: credentials are never read from specs; set "
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
                    )
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+/?$", v):
            raise ValueError("must look like http://host:port or https://host")
        return v.rstrip("/") if v else v


class GenerationSpec(_Spec):
    max_new_tokens: int = Field(32, ge=1, le=4096)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, description="with do_sample: seed applied to every batch")


def check_bitsandbytes(bits: int | None) -> int | None:
    """Checked where the spec is read, before any model loads (without importing torch)."""
    if bits and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize: {bits} needs bitsandbytes (pip install bitsandbytes; the dev and gpu "
                         "extras install it), or set quantize: null")
    return bits


# Output columns the caption job adds; id columns may not reuse them.
CAPTION_COLUMNS = ("caption", "error", "num_tokens", "model")


def not_blank(v: str) -> str:
    """A name, path or model id: stripped, and never empty."""
    if not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


def check_concurrency(v: Any) -> Any:
    """An actor pool's size: n, or [min, max] for a pool that grows and shrinks with the cluster."""
    if isinstance(v, list):
        v = tuple(v)
    if isinstance(v, tuple):
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("must be an int or [min, max] (two ints)")
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"[min, max] = {list(v)} needs 1 <= min <= max")
    elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("must be an int >= 1 or [min, max] (two ints)")
    return v


class CaptionSpec(_Spec):
    """`python -m jobs.caption SPEC.yaml`: caption every row of a set of Parquet shards."""

    input: str = Field(..., description="folder/prefix, single file or glob of Parquet shards (s3:// or local)")
    output: str = Field(..., description="folder/prefix for one Parquet object per input shard (s3:// or local)")
    image_column: str = "image"
    id_columns: list[str] = Field(default_factory=list, description="copied unchanged into the output")
    model: str = Field(..., description=(
        "TroL folder (local or s3://, cached once per node), hub id, or a released checkpoint "
        "(BK-Lee/TroL-1.8B|3.8B|7B or its folder: converted once per node into model_cache_dir)"))
    prompt: str = "Describe this image in one sentence."
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    batch_size: int = Field(8, ge=1, le=4096, description="images per generate() call")
    concurrency: int | tuple[int, int] = Field(
        1, description="predictor actors (model copies): n, or [min, max] for a pool that grows and shrinks with "
        "the cluster (`actors: n` is the older name of `concurrency: n`)")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="0 runs the model on CPU")
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPU reserved by each predictor actor")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal[4, 8] | None = Field(
        None, description="4 or 8: bitsandbytes weights for the LLM's linear layers (GPU or CPU; needs bitsandbytes)")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images become row errors")
    max_open_shards: int = Field(
        4, ge=1, le=4096,
        description="shards read at once (one reader task each, decoding on one CPU); the read-ahead that hides a "
                    "slow shard (see README); raise it with the actor count so decoding keeps up")
    retry_errors: bool = Field(False, description="re-caption only the rows with an error in already committed shards")
    transient_retries: int = Field(
        4, ge=0, le=20, description="retries (with backoff) of a batch or shard read after an infrastructure error")
    lease_seconds: float = Field(
        600.0, ge=1.0, description="a run's claim on the output lasts this long past its last renewal")
    stall_timeout_s: float = Field(
        1800.0, gt=0.0, description="no-progress watchdog: when nothing moves through the pipeline this long "
        "(e.g. actors wait for GPUs the cluster never offers), the run ends (exit 3) saying what it waited for; "
        "allow for the model's first download or conversion")
    model_cache_dir: str | None = Field(None, description="where s3:// models are cached; None: ~/.cache/trol-ray")
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @model_validator(mode="before")
    @classmethod
    def _actors_is_concurrency(cls, data: Any) -> Any:
        if isinstance(data, dict) and "actors" in data:
            if "concurrency" in data:
                raise SpecError("actors", "is the older name of concurrency; set only concurrency")
            data = {**data, "concurrency": data["actors"]}
            del data["actors"]
        return data

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        return check_concurrency(v)

    @field_validator("input", "output", "model", "image_column")
    @classmethod
    def _name(cls, v: str) -> str:
        return not_blank(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("id_columns")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a column twice")
        for name in v:
            if name in CAPTION_COLUMNS or name.startswith("__"):
                raise ValueError(f"{name!r} clashes with an output column; output columns are {CAPTION_COLUMNS}")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if any(c in v for c in "*?["):
            raise ValueError("must be a folder or prefix, not a glob")
        return v

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: int | None) -> int | None:
        return check_bitsandbytes(v)


class LoraSpec(_Spec):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="None: the LLM family's attention + MLP projections")


class MlflowSpec(_Spec):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store URI; None: a file store in output/name/mlruns")
    experiment: str = Field("trol-ray", description="MLflow experiment the run is logged under")


class TrackingSpec(_Spec):
    """Where training metrics go besides the log (rank 0 only). `mlflow: true` is `mlflow: {}`."""

    mlflow: MlflowSpec | None = Field(None, description="None: no MLflow run")
    tensorboard: bool = Field(False, description="TensorBoard event files in output/name/tensorboard/")

    @field_validator("mlflow", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return {} if v else None
        return v


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
    quantize: Literal[4] | None = Field(None, description="4: QLoRA (stage 2, DDP; GPU or CPU with bitsandbytes)")
    train_partial_lora: bool = Field(
        False, description="stage 2: also train a converted TroL-1.8B/7B's image-token partial LoRA (full: always)")
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
    # --- cluster-scale data and multi-node (issue 9) ---
    shuffle_window: int = Field(1024, ge=1, description="rows shuffled together after row groups are shuffled; 1: no local shuffle")
    data_cpus_per_task: float = Field(0.5, gt=0.0, description="CPU per Ray Data task that decodes and tokenises")
    data_tasks_per_worker: int = Field(
        1, ge=1, le=64, description="Ray Data tasks preparing micro-batches at once for each worker; their CPUs "
        "(x data_cpus_per_task) are reserved in the worker's placement-group bundle, so nothing else takes them")
    shared_paths: list[str] = Field(default_factory=list, description="local folders every node mounts (NFS, …); "
                                    "with several nodes, local output/data/base_model must lie under one")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    # --- benchmarks at the end (issue 16) ---
    evaluate: EvaluateAfterTraining | None = Field(
        None, description="benchmarks scored for the trained (and base) model; metrics join training_summary.json")

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: int | None) -> int | None:
        return check_bitsandbytes(v)

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
        if self.quantize and self.strategy == "fsdp":
            raise ValueError("strategy: fsdp cannot shard 4-bit weights; use strategy: ddp with quantize: 4, "
                             "or quantize: null with fsdp")
        return self


S = TypeVar("S", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` sets data["a"]["b"]; a number picks a list item (`benchmarks.0.data=…`);
    the value is parsed as YAML (8 → int, [x, y] → list)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError("--set", f"{item!r} is not key=value (example: --set generation.max_new_tokens=16)")
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(".".join(parts[:i]), f"is a list of {len(node)}; {part!r} is not an index of it")
                if last:
                    node[int(part)] = _parse_value(raw)
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise SpecError(".".join(parts[:i]), f"is not a section, cannot set {key!r}")
            if last:
                node[part] = _parse_value(raw)
            else:
                node = node.setdefault(part, {})
    return data


def _parse_value(raw: str) -> Any:
    """YAML scalars and explicit [..]/{..} collections; anything else stays a string, so
    `--set prompt=Caption: short` is the text, not a mapping."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
        return raw
    return value


def format_validation_error(exc: ValidationError) -> SpecError:
    """pydantic's text includes input values (maybe a pasted secret); ours never does."""
    lines, first = [], ""
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "(spec)"
        first = first or field
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; unknown fields are errors)"
        elif err["type"] == "missing":
            msg = "is required"
        lines.append(f"{field}: {msg}")
    return SpecError(first, lines[0].split(": ", 1)[1], text="; ".join(lines))


def build_spec(cls: type[S], data: Any, overrides: list[str] | None = None) -> S:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("(spec)", "the spec must be a YAML mapping of field: value")
    data = apply_overrides(data, list(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc) from None


def load_spec(cls: type[S], path: str | Path, overrides: list[str] | None = None) -> S:
    """Read a YAML spec file, apply `--set` overrides, validate."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError("(spec file)", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError("(spec file)", f"{str(path)!r} is not valid YAML{at}") from None
    return build_spec(cls, data, overrides)


def public_dump(spec: BaseModel) -> dict[str, Any]:
    """The spec as JSON-able data for summaries (specs hold no secrets by construction)."""
    return spec.model_dump(mode="json")
