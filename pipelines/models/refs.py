"""Where a model comes from: one place that checks a model location (driver side) and
turns it into files a node can load (workers), with the model's identity.

- `resolve_model_ref`: a local folder, an s3:// folder, a hub id or a released TroL
  checkpoint, checked without loading anything; its identity is recorded with outputs.
- `materialize_model`: the path from_pretrained opens on this node (s3:// downloaded once
  per node, released checkpoints converted once per node).
- `load_processor`: the model's TroLProcessor, once per worker process.

Caption, fine-tuning and evaluation all load models through here. `trol` (and torch) is
imported only inside `load_processor`, so a driver can check a spec without model code.
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
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from .released import converted_folder, is_released_folder, is_released_hub_id
from ..storage import Storage, StorageError, parse_uri

log = logging.getLogger(__name__)

# Weight files are skipped when a CPU preprocessing node needs only the processor files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMPLETE = ".trol-download-complete"


@dataclass(frozen=True)
class ModelRef:
    """A checked model reference: an absolute local folder, an s3:// folder, or a hub id."""

    kind: Literal["local", "s3", "hub", "released"]
    value: str
    # What the weights are: a digest of the files' names, sizes and versions (a hub id is
    # taken as is). Recorded with each committed shard; a changed model redoes the shards.
    identity: str = ""


def resolve_model_ref(model: str, storage: Storage) -> ModelRef:
    """Check that a model location can work, without loading anything (driver side)."""
    if model.startswith("s3://"):
        loc = parse_uri(model.rstrip("/"))
        if not storage.exists(loc.join("config.json")):
            raise StorageError(f"{loc.uri} has no config.json; point model at a saved TroL model folder")
        return ModelRef("s3", loc.uri, _digest(storage.listing_signature(loc)))
    looks_local = model.startswith(("/", ".", "~", "file://")) or os.path.exists(os.path.expanduser(model))
    if looks_local:
        path = parse_uri(model).path
        if not os.path.isdir(path):
            raise StorageError(f"local folder {path} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise StorageError(f"{path} has no config.json; point model at a saved TroL model folder")
        kind = "released" if is_released_folder(path) else "local"
        return ModelRef(kind, path, _digest(_local_signature(path)))
    if is_released_hub_id(model):  # BK-Lee/TroL-*: converted once per node where it is used
        return ModelRef("released", model, f"released:{model}")
    if "://" not in model and _HUB_ID.match(model):
        # Cannot be checked offline; from_pretrained resolves it (and caches it per node).
        return ModelRef("hub", model, f"hub:{model}")
    raise StorageError(f"{model!r} is neither a local folder, an s3:// folder nor a hub id like org/name")


def _digest(listing: Any) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def _local_signature(path: str) -> list[tuple[str, int, int]]:
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            out.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
    return out


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "trol-ray", "models")


def materialize_model(ref: ModelRef, storage: Storage, cache_dir: str | None, *, weights: bool = True) -> str:
    """A path (or hub id) that from_pretrained can open on this node.

    s3:// folders are downloaded once per node: the cache folder is named after the
    listing (keys, sizes, ETags), so a changed model gets a new folder, and a file lock
    makes every other actor or task on the node wait for the first download. A released
    TroL checkpoint (folder, s3:// folder or hub id) is converted once per node as well; its
    processor settings come from the weights' shapes, so a processor-only request converts
    the whole model too (and shares the result with the node's actors).
    """
    if ref.kind == "released":
        return converted_folder(ref.value, cache_dir)
    if ref.kind == "s3":
        path = _download(ref, storage, cache_dir, weights=weights)
        if not os.path.isfile(os.path.join(path, "processor_config.json")):  # a released layout
            return converted_folder(_download(ref, storage, cache_dir, weights=True), cache_dir)
        return path
    return ref.value


def _download(ref: ModelRef, storage: Storage, cache_dir: str | None, *, weights: bool) -> str:
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


# --- the processor, once per worker process ----------------------------------------------------

# Ray reuses worker processes across tasks: load each processor once per process.
_processors: dict[tuple[Any, ...], Any] = {}
_processors_lock = threading.Lock()


def _half_imported(exc: BaseException) -> bool:
    """True when an import failed because another thread of this process was importing the
    same module (torch, transformers) at that moment: Python hands the second thread the
    partially initialized module instead of deadlocking."""
    seen = []
    while exc is not None and exc not in seen:
        if "partially initialized module" in str(exc):
            return True
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return False


def load_processor(ref: ModelRef, storage: Storage, cache_dir: str | None) -> Any:
    key = (ref, storage, cache_dir)
    with _processors_lock:
        if key not in _processors:
            _processors[key] = _read_processor(materialize_model(ref, storage, cache_dir, weights=False))
        return _processors[key]


def _read_processor(path: str, attempts: int = 3) -> Any:
    """The processor in `path`; the last attempt returns it or raises."""
    for attempt in range(attempts):
        try:
            from trol import TroLProcessor

            return TroLProcessor.from_pretrained(path)
        except (ImportError, AttributeError) as exc:
            # Ray Data runs this in a worker where Ray's own threads may be importing torch
            # too (seen once in a full test run); that import completes, so trying again works.
            if attempt == attempts - 1 or not _half_imported(exc):
                raise
            log.warning("loading the processor met a half-imported module (%s); trying again", exc)
            time.sleep(1.0 + attempt)
