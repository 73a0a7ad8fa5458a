"""Moving the processor's per-row pixel arrays from CPU tasks to predictor actors.

The processor decides what a row's pixels are: today float32 (3, S, S); a tiling processor
returns (T, 3, S, S) with T varying per image, possibly uint8. So nothing here assumes a
shape or a dtype: each row travels as its raw bytes plus its own shape and dtype, in three
Arrow columns. Packing copies each array once into one contiguous buffer; unpacking makes
no copy at all (numpy views over the Arrow buffer, which Ray hands over zero-copy).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

PIXELS = "__pixels"
SHAPE = "__shape"
DTYPE = "__dtype"
PIXEL_COLUMNS = (PIXELS, SHAPE, DTYPE)
# Each row's bytes start on this boundary, so views of float arrays stay aligned.
_ALIGN = 64


def pack_arrays(arrays: list[np.ndarray | None]) -> dict[str, pa.Array]:
    """Per-row arrays (None for rows without pixels) → {column name: Arrow array}."""
    n = len(arrays)
    sizes = np.array([0 if a is None else a.nbytes for a in arrays], dtype=np.int64)
    padded = (sizes + _ALIGN - 1) // _ALIGN * _ALIGN
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(padded, out=offsets[1:])
    data = np.zeros(int(offsets[-1]), dtype=np.uint8)  # zeros: the alignment padding is part of what a batch is
    for i, arr in enumerate(arrays):
        if arr is not None and arr.nbytes:
            # The one copy: straight from the processor's array into the shared buffer.
            data[offsets[i] : offsets[i] + sizes[i]] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    valid = pa.array([a is not None for a in arrays], type=pa.bool_())
    missing = sum(a is None for a in arrays)
    pixels = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [valid.buffers()[1] if missing else None, pa.py_buffer(offsets), pa.py_buffer(data)],
        null_count=missing)
    shapes = pa.array([None if a is None else list(a.shape) for a in arrays], type=pa.list_(pa.int64()))
    dtypes = pa.array([None if a is None else a.dtype.str for a in arrays], type=pa.string())
    return {PIXELS: pixels, SHAPE: shapes, DTYPE: dtypes}


def unpack_arrays(table: pa.Table) -> list[np.ndarray | None]:
    """The inverse of pack_arrays: read-only views, one per row (None where no pixels)."""
    shapes = table.column(SHAPE).to_pylist()
    dtypes = table.column(DTYPE).to_pylist()
    out: list[np.ndarray | None] = []
    for chunk in table.column(PIXELS).chunks:
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        for j in range(len(chunk)):
            i = len(out)
            if dtypes[i] is None or not chunk[j].is_valid:
                out.append(None)
                continue
            dtype, shape = np.dtype(dtypes[i]), tuple(shapes[i])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            start = int(offsets[j])
            out.append(data[start : start + nbytes].view(dtype).reshape(shape))
    return out
