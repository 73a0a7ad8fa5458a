"""Image cells → the model's pixel arrays, on CPU (the decode + preprocess stage).

One function serves both the job's per-shard reader and the processor's preprocessing
stage in a user's pipeline. A cell is encoded bytes, a path/URI string, or an already
decoded array (what `ray.data.read_images` yields). Whatever goes wrong with one cell
becomes that row's error; only a store that stays unreachable through every retry is
raised (`TransientStorageError`), because retrying later can fix it and the caller decides
what that costs (the job fails the shard, the processor fails the row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ..storage.images import describe_exception, load_image
from ..storage.pixels import pack_arrays
from ..storage import Location, Storage, TransientStorageError, with_retries

_BYTES_OR_TEXT = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string, pa.types.is_large_string,
                  pa.types.is_binary_view, pa.types.is_string_view)


def column_cells(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """Python values of an image column: bytes, str, numpy arrays (decoded images), or None."""
    if any(check(column.type) for check in _BYTES_OR_TEXT):
        return column.to_pylist()
    if isinstance(column.type, pa.ExtensionType) or pa.types.is_fixed_size_list(column.type) \
            or pa.types.is_list(column.type):
        # Ray Data's tensor columns (fixed or variable shape): one array per row.
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        cells: list[Any] = []
        for chunk in chunks:
            if isinstance(chunk.type, pa.ExtensionType) and hasattr(chunk, "to_numpy"):
                values = chunk.to_numpy(zero_copy_only=False)
                cells.extend(values[i] if chunk[i].is_valid else None for i in range(len(chunk)))
            else:
                cells.extend(None if v is None else np.asarray(v) for v in chunk.to_pylist())
        return cells
    raise ValueError(f"type {column.type}: expected encoded image bytes, path/URI strings or decoded image arrays")


def _from_array(array: np.ndarray, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        return None, f"image array of shape {arr.shape} is not H×W, H×W×3 or H×W×4"
    if arr.shape[0] * arr.shape[1] > max_pixels:
        return None, (f"image is {arr.shape[1]}x{arr.shape[0]} = {arr.shape[0] * arr.shape[1]} pixels, over the "
                      f"limit of {max_pixels} (raise max_image_pixels to allow it)")
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.size and 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0:
            arr = (arr * 255.0).round()
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr)), None


def _pixels(proc: Any, img: Image.Image) -> np.ndarray:
    # uint8 tiles (T, 3, S, S), 4x fewer bytes than floats to move; the actor normalises them on its device.
    arr = np.asarray(proc.prepare_image(img))
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        raise ValueError(f"processor returned {arr.dtype} array of shape {arr.shape}")
    return arr


def prepare_cells(cells: list[Any], proc: Any, *, storage: Storage, base: Location | None, max_pixels: int,
                  retries: int, rows: list[int] | None = None) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Per cell: its pixel array or None, and an error or None. Relative paths are taken
    from `base`; a store error is retried `retries` times with backoff before it is raised.
    `rows` names the cells in messages (their indices in the shard)."""
    size = getattr(proc, "image_size", None)
    draft = int(size) if isinstance(size, int) else None
    arrays: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for i, cell in enumerate(cells):
        arr, err = None, None
        try:
            if isinstance(cell, np.ndarray):
                img, err = _from_array(cell, max_pixels)
            else:
                img, err = with_retries(
                    lambda: load_image(cell, max_pixels=max_pixels, storage=storage, base=base, draft_size=draft),
                    attempts=retries + 1, what=f"image of row {rows[i] if rows else i}")
            if err is None:
                try:
                    arr = _pixels(proc, img)
                except Exception as exc:  # noqa: BLE001 - a row must not fail its batch
                    err = f"preprocessing failed: {describe_exception(exc)}"
                finally:
                    img.close()
        except TransientStorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever one cell does, it stays that cell's error
            err = f"reading image failed: {describe_exception(exc)}"
        arrays.append(arr if err is None else None)
        errors.append(err)
    return arrays, errors


def with_pixels(table: pa.Table, arrays: list[np.ndarray | None], errors: list[str | None]) -> pa.Table:
    """`table` plus the `error` column and the packed pixel columns."""
    table = table.append_column("error", pa.array(errors, type=pa.string()))
    for name, column in pack_arrays(arrays).items():
        table = table.append_column(name, column)
    return table
