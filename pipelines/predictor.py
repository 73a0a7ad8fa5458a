"""The model side of the caption pipeline.

Where model files come from (`resolve_model_ref`, `materialize_model`, `load_processor`)
lives in pipelines.models; the names are re-exported here for the caption scheduler.
- `CaptionPredictor` (actor): loads trol.Captioner once, captions the rows of each packed
  batch that have pixels, passes error rows through. Infrastructure failures are not
  turned into row errors: a broken device ends the actor (Ray restarts it), and an
  out-of-memory that persists at one row is raised so the driver retries the batch.

`trol` (and with it torch) is imported only inside these, so the driver can validate a
spec and plan a job without loading any model code.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from .images import describe_exception
from .pixels import PIXEL_COLUMNS, unpack_arrays
from .models import ModelRef, default_cache_dir, load_processor, materialize_model, resolve_model_ref  # noqa: F401
from .storage import Storage

log = logging.getLogger(__name__)

# --- prediction (actor pool) ------------------------------------------------------------------


class InfrastructureError(RuntimeError):
    """The device or memory failed, not the rows: the batch is retried, then its shard fails."""


_BROKEN_DEVICE = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "cuDNN error",
                  "CUDNN_STATUS", "NCCL error", "uncorrectable ECC", "unspecified launch failure", "HIP error")


def classify_model_error(exc: BaseException) -> Literal["device", "memory", "row"]:
    """device: the accelerator is unusable for the rest of this process's life;
    memory: too much at once (a smaller batch may fit); row: something about the input."""
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ == "AcceleratorError" or any(marker in text for marker in _BROKEN_DEVICE):
        return "device"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return "memory"
    return "row"


class CaptionPredictor:
    """One model copy. The driver calls it with packed batches (see pipelines.pixels)."""

    def __init__(
        self,
        *,
        model: ModelRef,
        model_id: str,
        storage: Storage,
        cache_dir: str | None,
        dtype: str,
        quantize: int | None = None,
        device: str | None,
        prompt: str,
        generation: dict[str, Any],
    ):
        from trol import Captioner

        path = materialize_model(model, storage, cache_dir, weights=True)
        self.captioner = Captioner(path, dtype=dtype, device=device, model_id=model_id, quantize=quantize)
        self.prompt = prompt
        self.generation = generation
        self.actor = self._name()

    @staticmethod
    def _name() -> str:
        try:
            import ray

            if ray.is_initialized():
                return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
        except Exception:  # noqa: BLE001 - a name for the summary only
            pass
        return f"pid-{os.getpid()}"

    def _caption(self, arrays: list[np.ndarray]) -> list[tuple[str | None, int | None, str | None]]:
        """(caption, num_tokens, error) per array. A batch that fails for a reason of its
        rows is retried row by row (one bad row does not take the others down); one that
        runs out of memory is split in halves; a broken device ends this process."""
        try:
            results = self.captioner.caption(arrays, self.prompt, **self.generation)
            if len(results) != len(arrays):
                raise RuntimeError(f"captioner returned {len(results)} results for {len(arrays)} images")
            return [(r.text, int(r.num_tokens), None) for r in results]
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = classify_model_error(exc)
            if kind == "device":
                # Nothing run in this process can use the device again. Exiting makes Ray
                # restart the actor (a fresh process, a fresh context); the driver resends
                # the batches this actor held.
                log.error("device failure, restarting this actor: %s", describe_exception(exc))
                logging.shutdown()
                os._exit(70)
            if kind == "memory":
                if len(arrays) == 1:
                    raise InfrastructureError(f"out of memory on a single image: {describe_exception(exc)}") from None
                half = len(arrays) // 2
                return self._caption(arrays[:half]) + self._caption(arrays[half:])
            if len(arrays) == 1:
                return [(None, None, f"captioning failed: {describe_exception(exc)}")]
            log.warning("batch of %d failed (%s); retrying row by row", len(arrays), type(exc).__name__)
            return [self._caption([a])[0] for a in arrays]

    def __call__(self, batch: pa.Table) -> tuple[pa.Table, str]:
        """Packed rows in → (rows with caption, error, num_tokens; this actor's name)."""
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        arrays = unpack_arrays(batch)
        good = [i for i in range(n) if errors[i] is None and arrays[i] is not None]
        captions: list[str | None] = [None] * n
        tokens: list[int | None] = [None] * n
        if good:
            for i, (text, ntok, err) in zip(good, self._caption([arrays[i] for i in good])):
                captions[i], tokens[i], errors[i] = text, ntok, err
        out = batch.drop_columns([*PIXEL_COLUMNS, "error"])
        out = out.append_column("caption", pa.array(captions, type=pa.string()))
        out = out.append_column("error", pa.array(errors, type=pa.string()))
        out = out.append_column("num_tokens", pa.array(tokens, type=pa.int32()))
        return out, self.actor

    def model_id(self) -> str:
        return self.captioner.model_id
