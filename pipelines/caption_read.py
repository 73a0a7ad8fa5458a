"""Reading one input shard as a stream of packed batches (the CPU stage of captioning).

A shard is read batch by batch through a fixed read buffer, so a task holds one batch of
images and its pixels however large the shard or its row groups are. Each row's image is
decoded and preprocessed by the model's processor; whatever goes wrong with one row
becomes that row's `error` and the rest go on. Only two things stop a shard: the shard
itself cannot be read (`ShardReadError`, transient or not), or an image path's store stays
unreachable through every retry (transient: a rerun can do it).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .assembly import ROW
from .images import describe_exception, load_image
from .pixels import pack_arrays
from .storage import Location, Storage, TransientStorageError, describe_error, parse_uri, with_retries

# Bytes read ahead per column chunk: Parquet pages stream through this instead of a whole
# column chunk (a 1M-row single-row-group shard would otherwise load its whole image column).
READ_BUFFER_BYTES = 4 << 20


class ShardReadError(Exception):
    """A shard could not be read. `transient`: the store failed (retry later); otherwise
    the shard itself is bad (unreadable, changed since planning)."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries with its flag
        return (ShardReadError, (str(self), self.transient))


def _image_array(proc: Any, img: Any) -> np.ndarray:
    # uint8 tiles (T, 3, S, S), 4x fewer bytes than floats to move; the actor normalises them on its device.
    arr = np.asarray(proc.prepare_image(img))
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        raise ValueError(f"processor returned {arr.dtype} array of shape {arr.shape}")
    return arr


def process_rows(
    cells: list[Any], rows: np.ndarray, proc: Any, *, storage: Storage, base: Location, max_pixels: int, retries: int
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Per row: pixel array or None, and an error or None."""
    size = getattr(proc, "image_size", None)
    draft = int(size) if isinstance(size, int) else None
    arrays: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for cell, row in zip(cells, rows.tolist()):
        arr, err = None, None
        try:
            img, err = with_retries(
                lambda: load_image(cell, max_pixels=max_pixels, storage=storage, base=base, draft_size=draft),
                attempts=retries + 1, what=f"image of row {row}")
            if err is None:
                try:
                    arr = _image_array(proc, img)
                except Exception as exc:  # noqa: BLE001 - a row must not fail its batch
                    err = f"preprocessing failed: {describe_exception(exc)}"
                finally:
                    img.close()
        except TransientStorageError as exc:
            raise ShardReadError(f"row {row}: {exc} (after {retries} retries)", transient=True) from None
        except Exception as exc:  # noqa: BLE001 - whatever one cell does, it stays that cell's error
            err = f"reading image failed: {describe_exception(exc)}"
        arrays.append(arr if err is None else None)
        errors.append(err)
    return arrays, errors


def iter_shard_batches(
    uri: str,
    *,
    proc: Any,
    storage: Storage,
    image_column: str,
    id_columns: list[str],
    num_rows: int,
    batch_rows: int,
    max_pixels: int,
    retries: int,
    wanted: np.ndarray | None = None,
) -> Iterator[pa.Table]:
    """Packed batches of at most `batch_rows` rows: the id columns, `__row` (index in the
    shard), `error` and the pixel columns. With `wanted`, only those row indices."""
    loc = parse_uri(uri)
    base = Location(loc.scheme, posixpath.dirname(loc.path))
    columns = list(dict.fromkeys([image_column, *id_columns]))
    want = None
    if wanted is not None:
        want = np.zeros(num_rows, dtype=bool)
        want[np.asarray(wanted, dtype=np.int64)] = True
    offset = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    try:
        with storage.filesystem(loc).open_input_file(loc.path) as f:
            reader = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            if reader.metadata.num_rows != num_rows:
                raise ShardReadError(f"has {reader.metadata.num_rows} rows, {num_rows} when the job was planned; "
                                     "it changed during the run", transient=False)
            for rb in reader.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
                rows = np.arange(offset, offset + rb.num_rows, dtype=np.int64)
                offset += rb.num_rows
                if want is not None:
                    keep = want[rows]
                    if not keep.any():
                        continue
                    rb = rb.filter(pa.array(keep))
                    rows = rows[keep]
                arrays, errors = process_rows(rb.column(image_column).to_pylist(), rows, proc, storage=storage,
                                              base=base, max_pixels=max_pixels, retries=retries)
                table = pa.Table.from_batches([rb]).select(id_columns)
                table = table.append_column(ROW, pa.array(rows, type=pa.int64()))
                table = table.append_column("error", pa.array(errors, type=pa.string()))
                for name, column in pack_arrays(arrays).items():
                    table = table.append_column(name, column)
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= batch_rows:  # only sparse (retry_errors) reads gather several
                    yield pa.concat_tables(pending)
                    pending, pending_rows = [], 0
    except ShardReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified: store trouble is transient, the rest is the shard's
        err = describe_error(exc, "reading")
        raise ShardReadError(f"reading shard failed after {offset} rows: {str(err).removeprefix('reading: ')}",
                             transient=isinstance(err, TransientStorageError)) from None
    if pending:
        yield pa.concat_tables(pending)
    if offset != num_rows:
        raise ShardReadError(f"gave {offset} rows, its footer says {num_rows}", transient=False)


def read_shard_stream(uri: str, *, model: Any, cache_dir: str | None, **kwargs: Any) -> Iterator[Any]:
    """The Ray streaming task: per batch, a small header then the packed table, so the
    driver learns a batch's size (or the shard's failure) without fetching any pixels.
    The stream ends with a header saying how it ended."""
    from .predictor import load_processor

    try:
        proc = load_processor(model, kwargs["storage"], cache_dir)
        for table in iter_shard_batches(uri, proc=proc, **kwargs):
            yield {"rows": table.num_rows}
            yield table
        yield {"end": "done"}
    except ShardReadError as exc:
        yield {"end": "failed", "reason": str(exc), "transient": exc.transient}
    except Exception as exc:  # noqa: BLE001 - e.g. the processor cannot load: the shard fails, not the task
        err = describe_error(exc, "preparing to read")
        yield {"end": "failed", "reason": str(err), "transient": isinstance(err, TransientStorageError)}
