"""The two model-facing stages of the caption pipeline, and where the model files come from.

- `preprocess_batch` (CPU tasks): image cell → RGB → the model's TroLProcessor → a
  fixed-shape float32 tensor column; bad rows get an `error` and zero pixels.
- `CaptionPredictor` (actor pool): loads trol.Captioner once per actor, captions the
  good rows of each batch, passes error rows through.

`trol` (and with it torch) is imported only inside these stages, so the driver can
validate a spec and plan a job without loading any model code.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from .images import load_image
from .storage import Location, Storage, StorageError, parse_uri

log = logging.getLogger(__name__)

PIXELS = "__pixels"
IMAGE_BYTES = "__image_bytes"
IMAGE_PATH = "__image_path"
SHARD = "__shard"
ROW = "__row"
ACTOR = "__actor"
# Weight files are skipped when a CPU preprocessing node needs only the processor files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMPLETE = ".trol-download-complete"


@dataclass(frozen=True)
class ModelRef:
    """A checked model reference: an absolute local folder, an s3:// folder, or a hub id."""

    kind: Literal["local", "s3", "hub"]
    value: str


def resolve_model_ref(model: str, storage: Storage) -> ModelRef:
    """Check that a model location can work, without loading anything (driver side)."""
    if model.startswith("s3://"):
        loc = parse_uri(model.rstrip("/"))
        if not storage.exists(loc.join("config.json")):
            raise StorageError(f"{loc.uri} has no config.json; point model at a saved TroL model folder")
        return ModelRef("s3", loc.uri)
    looks_local = model.startswith(("/", ".", "~", "file://")) or os.path.exists(os.path.expanduser(model))
    if looks_local:
        path = parse_uri(model).path
        if not os.path.isdir(path):
            raise StorageError(f"local folder {path} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise StorageError(f"{path} has no config.json; point model at a saved TroL model folder")
        return ModelRef("local", path)
    if "://" not in model and _HUB_ID.match(model):
        # Cannot be checked offline; from_pretrained resolves it (and caches it per node).
        return ModelRef("hub", model)
    raise StorageError(f"{model!r} is neither a local folder, an s3:// folder nor a hub id like org/name")


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "trol-ray", "models")


def materialize_model(ref: ModelRef, storage: Storage, cache_dir: str | None, *, weights: bool = True) -> str:
    """A path (or hub id) that from_pretrained can open on this node.

    s3:// folders are downloaded once per node: the cache folder is named after the
    listing (keys, sizes, ETags), so a changed model gets a new folder, and a file lock
    makes every other actor or task on the node wait for the first download.
    """
    if ref.kind != "s3":
        return ref.value
    loc = parse_uri(ref.value)
    listing = storage.listing_signature(loc)
    digest = hashlib.sha256(json.dumps([ref.value, listing]).encode()).hexdigest()[:16]
    root = cache_dir or default_cache_dir()
    name = posixpath.basename(loc.path.rstrip("/")) or "model"
    full = os.path.join(root, f"{name}-{digest}")
    if os.path.exists(os.path.join(full, _COMPLETE)):
        return full
    target = full if weights else f"{full}-processor"
    if os.path.exists(os.path.join(target, _COMPLETE)):
        return target
    os.makedirs(root, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(target, _COMPLETE)):  # someone finished while we waited
            return target
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            keep = (lambda rel: True) if weights else (lambda rel: not rel.endswith(_WEIGHT_SUFFIXES))
            storage.download_folder(loc, tmp, keep=keep)
            open(os.path.join(tmp, _COMPLETE), "w").close()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded %s to %s", ref.value, target)
    return target


# --- preprocessing (CPU tasks) ----------------------------------------------------------------

# Ray reuses worker processes across tasks: load each processor once per process.
_processors: dict[tuple[Any, ...], Any] = {}
_processors_lock = threading.Lock()


def _processor(ref: ModelRef, storage: Storage, cache_dir: str | None) -> Any:
    key = (ref, storage, cache_dir)
    with _processors_lock:
        if key not in _processors:
            from trol import TroLProcessor

            _processors[key] = TroLProcessor.from_pretrained(materialize_model(ref, storage, cache_dir, weights=False))
        return _processors[key]


def preprocess_batch(
    batch: pa.Table, *, model: ModelRef, storage: Storage, cache_dir: str | None, max_pixels: int
) -> pa.Table:
    """The CPU-task stage: image cells → `__pixels` (N, 3, S, S) float32 and `error`."""
    return preprocess_with(batch, _processor(model, storage, cache_dir), storage=storage, max_pixels=max_pixels)


def preprocess_with(batch: pa.Table, proc: Any, *, storage: Storage, max_pixels: int) -> pa.Table:
    """Decode and preprocess every row with `proc`; a bad row gets an error and zero pixels."""
    size = int(proc.image_size)
    n = batch.num_rows
    pixels = np.zeros((n, 3, size, size), dtype=np.float32)
    errors: list[str | None] = [None] * n
    data, paths = batch.column(IMAGE_BYTES).to_pylist(), batch.column(IMAGE_PATH).to_pylist()
    shards = batch.column(SHARD).to_pylist()
    prior = batch.column("error").to_pylist()
    bases: dict[str, Location] = {}
    for i in range(n):
        if prior[i] is not None:  # a shard-read failure marker: keep its message
            errors[i] = prior[i]
            continue
        base = bases.get(shards[i])
        if base is None:
            shard = parse_uri(shards[i])
            base = bases[shards[i]] = Location(shard.scheme, posixpath.dirname(shard.path))
        value = data[i] if data[i] is not None else paths[i]
        img, err = load_image(value, max_pixels=max_pixels, storage=storage, base=base, draft_size=size)
        if err is None:
            try:
                arr = np.asarray(proc.preprocess_image(img), dtype=np.float32)
                if arr.shape != (3, size, size):
                    raise ValueError(f"processor returned shape {arr.shape}, expected (3, {size}, {size})")
                pixels[i] = arr
            except Exception as exc:  # a row must not fail its batch
                err = f"preprocessing failed: {type(exc).__name__}: {exc}"
        errors[i] = err
    out = batch.drop_columns([IMAGE_BYTES, IMAGE_PATH, "error"])
    out = out.append_column(PIXELS, pa.FixedShapeTensorArray.from_numpy_ndarray(pixels))
    return out.append_column("error", pa.array(errors, type=pa.string()))


# --- prediction (actor pool) ------------------------------------------------------------------


class CaptionPredictor:
    """One model copy. Ray Data calls it with batches of preprocessed rows."""

    def __init__(
        self,
        *,
        model: ModelRef,
        model_id: str,
        storage: Storage,
        cache_dir: str | None,
        dtype: str,
        device: str | None,
        prompt: str,
        generation: dict[str, Any],
        preprocess_max_pixels: int | None = None,
    ):
        from trol import Captioner

        import ray

        path = materialize_model(model, storage, cache_dir, weights=True)
        self.captioner = Captioner(path, dtype=dtype, device=device, model_id=model_id)
        self.prompt = prompt
        self.generation = generation
        self.storage = storage
        # Set when this actor also preprocesses (CPU-only runs): see build_dataset.
        self.preprocess_max_pixels = preprocess_max_pixels
        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        self.actor = (ctx.get_actor_id() if ctx else None) or f"pid-{os.getpid()}"

    def _caption(self, arrays: list[np.ndarray]) -> list[tuple[str | None, int | None, str | None]]:
        """(caption, num_tokens, error) per array. A failing batch is retried row by row, so
        one bad row (or one out-of-memory batch) does not take the others down."""
        try:
            results = self.captioner.caption(arrays, self.prompt, **self.generation)
            if len(results) != len(arrays):
                raise RuntimeError(f"captioner returned {len(results)} results for {len(arrays)} images")
            return [(r.text, int(r.num_tokens), None) for r in results]
        except Exception as exc:
            if len(arrays) == 1:
                return [(None, None, f"captioning failed: {type(exc).__name__}: {exc}")]
            log.warning("batch of %d failed (%s); retrying row by row", len(arrays), type(exc).__name__)
            return [self._caption([a])[0] for a in arrays]

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.preprocess_max_pixels is not None:
            batch = preprocess_with(batch, self.captioner.processor, storage=self.storage,
                                    max_pixels=self.preprocess_max_pixels)
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        good = [i for i, e in enumerate(errors) if e is None]
        captions: list[str | None] = [None] * n
        tokens: list[int | None] = [None] * n
        if good:
            pixels = batch.column(PIXELS).combine_chunks().to_numpy_ndarray()
            # Copies: the Arrow buffer is read-only, and torch warns on non-writable arrays.
            for i, (text, ntok, err) in zip(good, self._caption([np.array(pixels[i]) for i in good])):
                captions[i], tokens[i], errors[i] = text, ntok, err
        out = batch.drop_columns([PIXELS, "error"])
        out = out.append_column("caption", pa.array(captions, type=pa.string()))
        out = out.append_column("error", pa.array(errors, type=pa.string()))
        out = out.append_column("num_tokens", pa.array(tokens, type=pa.int32()))
        out = out.append_column("model", pa.array([self.captioner.model_id] * n, type=pa.string()))
        return out.append_column(ACTOR, pa.array([self.actor] * n, type=pa.string()))
