"""The TroL predictor: a Ray Data actor-pool stage that captions packed pixel rows.

`CaptionPredictor` loads `trol.Captioner` once per actor and captions each batch's rows
that have pixels; rows that already carry an `error` pass through. Failures are sorted by
what they say about the rows:

- a row's own problem: the batch is retried row by row, so only that row gets an `error`;
- out of memory: the batch is split in halves; a single image that still does not fit is
  retried with backoff, then given up (`__fatal` in the job, `error` in a user pipeline);
- a broken device (CUDA error): nothing in this process can use it again, so the process
  exits; Ray restarts the actor (a fresh process) and retries the batch;
- a batch that kills its process every time (a poison batch): the actor notes on local
  disk which batch it is captioning, so its restarted process knows which batch its
  predecessor died on. A batch that killed it `give_up_after` times is not captioned
  again: its rows are marked (`__fatal`: the job fails their shard with this reason;
  `error` in a user pipeline). Batches that were only queued behind it are retried as
  usual. Ray's own bound on retries (`max_task_retries`) stays as a backstop.

`trol` (and torch) is imported only when an actor starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from ..storage.images import describe_exception
from ..models import ModelRef, materialize_model
from ..storage.pixels import PIXEL_COLUMNS, PIXELS, unpack_arrays
from ..storage import Storage

log = logging.getLogger(__name__)

FATAL = "__fatal"  # job only: why this row's shard must fail (its rows are not captioned)
ACTOR = "__actor"  # job only: which predictor actor captioned the row (the summary's rows_per_actor)
DONE_AT = "__done_at"  # job only: when its batch was captioned (the summary's start-up and steady rate)

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


class GiveUp(Exception):
    """Infrastructure, not the rows, failed for good: the batch's rows are not captioned."""


class DeathLedger:
    """Which batch (Ray task) this actor's previous processes died captioning, kept in a
    node-local folder named after the actor (its id survives restarts)."""

    def __init__(self, actor_id: str):
        self.folder = os.path.join(tempfile.gettempdir(), "trol-caption-actors", actor_id)
        os.makedirs(self.folder, exist_ok=True)
        self.running_file = os.path.join(self.folder, "running")
        self.deaths_file = os.path.join(self.folder, "deaths.json")
        self.counts: dict[str, int] = {}
        try:
            with open(self.deaths_file) as f:
                self.counts = json.load(f)
        except (OSError, ValueError):
            pass
        try:
            with open(self.running_file) as f:
                died_on = f.read().strip()
        except OSError:
            return
        if died_on:  # the previous process ended inside this batch
            self.counts[died_on] = self.counts.get(died_on, 0) + 1
            with open(self.deaths_file, "w") as f:
                json.dump(self.counts, f)
        os.unlink(self.running_file)

    def deaths(self, key: str) -> int:
        return self.counts.get(key, 0)

    def running(self, key: str) -> None:
        with open(self.running_file, "w") as f:
            f.write(key)

    def finished(self) -> None:
        try:
            os.unlink(self.running_file)
        except OSError:
            pass


def batch_key(batch: pa.Table) -> str:
    """What names a batch across Ray's retries of it: a digest of its rows (the job's row
    identity where present, and the pixels' sizes and leading and trailing bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(batch.num_rows).encode())
    for name in ("__shard", "__row"):
        if name in batch.column_names:
            digest.update(batch.column(name).to_numpy().tobytes())
    for chunk in batch.column(PIXELS).chunks:
        _, offsets, data = chunk.buffers()
        digest.update(memoryview(offsets)[chunk.offset * 8:(chunk.offset + len(chunk) + 1) * 8])
        if data is not None:
            view = memoryview(data)
            digest.update(view[: 1 << 20])
            digest.update(view[-(1 << 20):])
    return digest.hexdigest()


class CaptionPredictor:
    """One model copy; `__call__` takes and returns a pyarrow batch (map_batches)."""

    def __init__(
        self,
        *,
        model: ModelRef,
        model_id: str,
        storage: Storage,
        cache_dir: str | None,
        dtype: str,
        quantize: int | None,
        device: str | None,
        prompt: str,
        prompt_column: str | None,
        generation: dict[str, Any],
        give_up_after: int,
        for_job: bool,
    ):
        from trol import Captioner

        path = materialize_model(model, storage, cache_dir, weights=True)
        self.captioner = Captioner(path, dtype=dtype, device=device, model_id=model_id, quantize=quantize)
        self.prompt, self.prompt_column, self.generation = prompt, prompt_column, generation
        self.give_up_after, self.for_job = give_up_after, for_job
        self.actor = _actor_name()
        self.ledger = DeathLedger(self.actor) if not self.actor.startswith("pid-") else None

    def _caption(self, arrays: list[np.ndarray], prompts: list[str]) -> list[tuple[str | None, int | None, str | None]]:
        """(caption, num_tokens, error) per array; raises GiveUp for a single image that
        runs out of memory every time."""
        try:
            results = self.captioner.caption(arrays, prompts, **self.generation)
            if len(results) != len(arrays):
                raise RuntimeError(f"captioner returned {len(results)} results for {len(arrays)} images")
            return [(r.text, int(r.num_tokens), None) for r in results]
        except GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = classify_model_error(exc)
            if kind == "device":
                # Nothing run in this process can use the device again. Exiting makes Ray
                # restart the actor (a fresh process, a fresh context) and retry the batch.
                log.error("device failure, restarting this actor: %s", describe_exception(exc))
                logging.shutdown()
                os._exit(70)
            if kind == "memory":
                if len(arrays) == 1:
                    return [self._one_image_again(arrays[0], prompts[0], exc)]
                half = len(arrays) // 2
                return self._caption(arrays[:half], prompts[:half]) + self._caption(arrays[half:], prompts[half:])
            if len(arrays) == 1:
                return [(None, None, f"captioning failed: {describe_exception(exc)}")]
            log.warning("batch of %d failed (%s); retrying row by row", len(arrays), type(exc).__name__)
            return [self._caption([a], [p])[0] for a, p in zip(arrays, prompts)]

    def _one_image_again(self, array: np.ndarray, prompt: str, first: BaseException) -> tuple[str | None, int | None, str | None]:
        """One image out of memory: memory held by other work may free up; try a few times."""
        last = first
        for wait in (1.0, 2.0, 4.0)[: max(0, self.give_up_after - 1)]:
            time.sleep(wait)
            try:
                r = self.captioner.caption([array], [prompt], **self.generation)[0]
                return r.text, int(r.num_tokens), None
            except Exception as exc:  # noqa: BLE001
                if classify_model_error(exc) != "memory":
                    return None, None, f"captioning failed: {describe_exception(exc)}"
                last = exc
        raise GiveUp(f"out of memory on a single image: {describe_exception(last)}")

    def _prompts(self, batch: pa.Table, errors: list[str | None]) -> list[str]:
        if self.prompt_column is None:
            return [self.prompt] * batch.num_rows
        prompts = batch.column(self.prompt_column).to_pylist()
        for i, p in enumerate(prompts):
            if errors[i] is None and (not isinstance(p, str) or not p.strip()):
                errors[i] = f"prompt column {self.prompt_column!r} is {'null' if p is None else 'empty'} in this row"
        return [p if isinstance(p, str) else "" for p in prompts]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        prompts = self._prompts(batch, errors)
        captions: list[str | None] = [None] * n
        tokens: list[int | None] = [None] * n
        fatal: list[str | None] = [None] * n
        arrays = unpack_arrays(batch)
        good = [i for i in range(n) if errors[i] is None and arrays[i] is not None]
        ledger = self.ledger
        key = batch_key(batch) if ledger is not None and good else None
        deaths = ledger.deaths(key) if key else 0
        if good and deaths >= self.give_up_after:
            times = f"{deaths} time{'s' if deaths != 1 else ''}"
            why = (f"the predictor's process died {times} while captioning a batch of {len(good)} rows "
                   "(a poison batch: the actor's log has what it did last); its rows were not captioned")
            log.error("%s", why)
            self._give_up(good, why, errors, fatal)
        elif good:
            if key:
                ledger.running(key)
            try:
                results = self._caption([arrays[i] for i in good], [prompts[i] for i in good])
                for i, (text, ntok, err) in zip(good, results):
                    captions[i], tokens[i], errors[i] = text, ntok, err
            except GiveUp as exc:
                self._give_up(good, str(exc), errors, fatal)
            finally:
                if ledger is not None:
                    ledger.finished()
        out = batch.drop_columns([c for c in (*PIXEL_COLUMNS, "error") if c in batch.column_names])
        out = out.append_column("caption", pa.array(captions, type=pa.string()))
        out = out.append_column("error", pa.array(errors, type=pa.string()))
        out = out.append_column("num_tokens", pa.array(tokens, type=pa.int32()))
        if self.for_job:
            out = out.append_column(FATAL, pa.array(fatal, type=pa.string())) if FATAL not in out.column_names \
                else _merge_fatal(out, fatal)
            out = out.append_column(ACTOR, pa.array([self.actor] * n, type=pa.string()))
            out = out.append_column(DONE_AT, pa.array(np.full(n, time.time()), type=pa.float64()))
        return out

    def _give_up(self, rows: list[int], why: str, errors: list[str | None], fatal: list[str | None]) -> None:
        for i in rows:
            if self.for_job:
                fatal[i] = why
            else:
                errors[i] = why


def _merge_fatal(out: pa.Table, fatal: list[str | None]) -> pa.Table:
    """The job's reader marks unreadable shards in `__fatal` already; keep those marks."""
    before = out.column(FATAL).to_pylist()
    merged = [b if b is not None else f for b, f in zip(before, fatal)]
    return out.set_column(out.schema.get_field_index(FATAL), FATAL, pa.array(merged, type=pa.string()))


def _actor_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
    except Exception:  # noqa: BLE001 - a name for the summary only
        pass
    return f"pid-{os.getpid()}"
