"""TroL captioning as Ray Data stages: a processor for any Ray Data pipeline.

    from pipelines.caption import CaptionProcessorConfig, build_caption_processor

    caption = build_caption_processor(CaptionProcessorConfig(model="./trol-3.8b", concurrency=(1, 4),
                                                             gpus_per_actor=1, batch_size=32))
    ds = caption(ray.data.read_images("s3://bucket/photos/"))       # any source
    ds.filter(lambda row: row["error"] is None).write_parquet("s3://bucket/captions/")  # any sink

Two stages, each a `map_batches`:

1. decode + preprocess (CPU tasks): each row's image (encoded bytes, a path/URI, or a
   decoded array as `read_images` gives) becomes the model's uint8 pixel tiles; a row whose
   image cannot be read gets an `error` and goes on;
2. the TroL predictor (an actor pool of `concurrency` model copies, restartable, each
   batch retried a bounded number of times): adds `caption`, `error`, `num_tokens`.

Every input row comes out once, in a row of its own: input columns pass through (the image
column is dropped unless `keep_image_column`, so pixels and image bytes are not carried to
the sink), internal pixel columns never leak. The job (pipelines.caption.job) runs the same
two pieces behind its own per-shard reader. Nothing here changes Ray's global DataContext.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from ..storage.images import DEFAULT_MAX_PIXELS
from ..models import ModelRef, load_processor, resolve_model_ref
from ..storage.pixels import PIXEL_COLUMNS
from ..specs import (GenerationSpec, SpecError, StorageSpec, _Spec, check_bitsandbytes, check_concurrency,
                     not_blank)
from ..storage import Storage, StorageError, TransientStorageError, parse_uri
from .predictor import ACTOR, FATAL, CaptionPredictor
from .preprocess import column_cells, prepare_cells, with_pixels

OUTPUT_COLUMNS = ("caption", "error", "num_tokens")
Concurrency = int | tuple[int, int]


class CaptionProcessorConfig(_Spec):
    """What `build_caption_processor` needs; unknown fields are errors that name the field."""

    model: str = Field(..., description="TroL folder (local or s3://), hub id, or a released TroL checkpoint")
    prompt: str = Field("Describe this image in one sentence.", description="the user message for every row")
    prompt_column: str | None = Field(None, description="a column holding each row's own user message (e.g. a "
                                      "question with its options); rows with different prompts share batches")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    batch_size: int = Field(8, ge=1, le=4096, description="images per generate() call")
    concurrency: Concurrency = Field(1, description="predictor actors (model copies): n, or [min, max] to autoscale")
    cpus_per_actor: float = Field(1.0, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0, description="0 runs the model on CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal[4, 8] | None = Field(None, description="4 or 8: bitsandbytes LLM weights (CUDA GPUs or CPU)")
    image_column: str = "image"
    keep_image_column: bool = Field(False, description="keep the input image column in the output (default: "
                                    "dropped, so image bytes or decoded arrays do not travel on to the sink)")
    image_root: str | None = Field(None, description="folder/prefix that relative image paths start from")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images become row errors")
    preprocess_cpus: float = Field(1.0, gt=0.0, description="CPUs per decode + preprocess task")
    preprocess_concurrency: int | None = Field(None, ge=1, description="decode tasks at once; None: Ray Data decides")
    transient_retries: int = Field(4, ge=0, le=20, description="retries of an image read from an unreachable "
                                   "store, and of a batch whose actor died")
    model_cache_dir: str | None = Field(None, description="where s3:// models are cached; None: ~/.cache/trol-ray")
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        return check_concurrency(v)

    @field_validator("model", "image_column")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        return not_blank(v)

    @model_validator(mode="after")
    def _consistent(self) -> CaptionProcessorConfig:
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        check_bitsandbytes(self.quantize)  # its wheel runs 4- and 8-bit layers on CPU too
        if self.prompt_column is not None and self.prompt_column == self.image_column:
            raise ValueError("prompt_column and image_column name the same column")
        return self

    @property
    def actor_range(self) -> tuple[int, int]:
        c = self.concurrency
        return (c, c) if isinstance(c, int) else c


def preprocess_batch(batch: pa.Table, *, model: ModelRef, storage: Storage, cache_dir: str | None, image_column: str,
                     keep_image_column: bool, image_root: str | None, max_pixels: int, retries: int) -> pa.Table:
    """Stage 1 (CPU task): the batch's columns (minus the image column unless kept) plus
    `error` and the packed pixel columns."""
    clash = [c for c in (*OUTPUT_COLUMNS, *PIXEL_COLUMNS, FATAL, ACTOR) if c in batch.column_names]
    if clash:
        raise ValueError(f"the input already has column(s) {clash}, which the caption processor writes; "
                         "rename or drop them before captioning")
    if image_column not in batch.column_names:
        raise ValueError(f"image_column {image_column!r} is not in the input; its columns are {batch.column_names}")
    proc = load_processor(model, storage, cache_dir)
    cells = column_cells(batch.column(image_column))
    base = parse_uri(image_root.rstrip("/") or "/") if image_root else None
    try:
        arrays, errors = prepare_cells(cells, proc, storage=storage, base=base, max_pixels=max_pixels, retries=retries)
    except TransientStorageError:  # the store stayed down: read the batch cell by cell, each failing alone
        arrays, errors = [], []
        for cell in cells:
            try:
                a, e = prepare_cells([cell], proc, storage=storage, base=base, max_pixels=max_pixels, retries=0)
            except TransientStorageError as exc:
                a, e = [None], [f"reading image failed: the store stayed unreachable ({exc})"]
            arrays += a
            errors += e
    kept = batch if keep_image_column else batch.drop_columns([image_column])
    return with_pixels(kept, arrays, errors)


def predictor_stage_args(config: CaptionProcessorConfig, model: ModelRef, storage: Storage, *,
                         for_job: bool, prompt_column: str | None) -> dict[str, Any]:
    """map_batches arguments of the predictor actor pool (the processor's and the job's)."""
    import ray

    low, high = config.actor_range
    last_retry = 2 * (config.transient_retries + 1) + 1
    compute = ray.data.ActorPoolStrategy(size=low) if low == high else ray.data.ActorPoolStrategy(
        min_size=low, max_size=high)
    return dict(
        compute=compute, batch_size=config.batch_size, batch_format="pyarrow", zero_copy_batch=True,
        num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None, udf_modifying_row_count=False,
        fn_constructor_kwargs=dict(
            model=model, model_id=config.model, storage=storage, cache_dir=config.model_cache_dir, dtype=config.dtype,
            quantize=config.quantize, device="cpu" if config.gpus_per_actor == 0 else None, prompt=config.prompt,
            prompt_column=prompt_column, generation=config.generation.model_dump(),
            give_up_after=config.transient_retries + 1, for_job=for_job),
        # Restartable actors only (an actor that ends dead for good is never replaced, Ray
        # issue #62746). A batch that killed its actor transient_retries + 1 times is marked
        # instead of captioned (CaptionPredictor's death ledger), so a poison batch cannot
        # loop forever, as it does under Ray's default of endless retries. Batches queued
        # behind it die with it as often, so Ray may retry one up to that many times more;
        # past that, Ray Data drops the batch (and the job fails its shard as incomplete).
        max_restarts=-1, max_task_retries=last_retry,
    )


def add_predictor(ds: Any, args: dict[str, Any]) -> Any:
    """`ds.map_batches(CaptionPredictor, **args)`. Ray 2.60 takes an actor's max_restarts /
    max_task_retries only as extra remote args, which it marks deprecated for 2.64."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated.*")
        return ds.map_batches(CaptionPredictor, **args)


class CaptionProcessor:
    """`Dataset -> Dataset`: decode + preprocess, then the TroL predictor pool."""

    def __init__(self, config: CaptionProcessorConfig, model: ModelRef, storage: Storage):
        self.config, self.model, self.storage = config, model, storage

    def __call__(self, ds: Any) -> Any:
        import ray

        c = self.config
        pre = ray.data.TaskPoolStrategy(size=c.preprocess_concurrency) if c.preprocess_concurrency else None
        ds = ds.map_batches(
            preprocess_batch, batch_size=c.batch_size, batch_format="pyarrow", num_cpus=c.preprocess_cpus,
            compute=pre, udf_modifying_row_count=False,
            fn_kwargs=dict(model=self.model, storage=self.storage, cache_dir=c.model_cache_dir,
                           image_column=c.image_column, keep_image_column=c.keep_image_column,
                           image_root=c.image_root, max_pixels=c.max_image_pixels, retries=c.transient_retries))
        return add_predictor(ds, predictor_stage_args(c, self.model, self.storage, for_job=False,
                                                      prompt_column=c.prompt_column))


def build_caption_processor(config: CaptionProcessorConfig | dict[str, Any]) -> Callable[[Any], Any]:
    """A `Dataset -> Dataset` that captions every row (see the module docstring). Checks the
    model location and storage now, on the driver, so a wrong path fails before any work."""
    if isinstance(config, dict):
        from ..specs import build_spec

        config = build_spec(CaptionProcessorConfig, config)
    try:
        storage = Storage.from_environment(config.storage.endpoint_url, config.storage.region)
    except StorageError as exc:
        raise SpecError("storage", str(exc)) from None
    try:
        model = resolve_model_ref(config.model, storage)
    except StorageError as exc:
        raise SpecError("model", str(exc)) from None
    return CaptionProcessor(config, model, storage)
