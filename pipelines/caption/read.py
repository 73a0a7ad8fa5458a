"""The caption job's per-shard reader: the first stage of its Ray Data pipeline.

The job starts from `ray.data.from_items(planned shards)`, one block per shard, and maps
`read_shards` over it one shard per task (`map_batches(batch_size=1)`, a generator). Why
not `read_parquet`: it packs row groups of many files into one read task, so one bad file
silently drops healthy shards with it, and shards interleave.

For its shard, the task streams the Parquet file through a fixed read buffer, batch by
batch, and decodes + preprocesses each batch's images (`preprocess.prepare_cells`: a bad
image is that row's `error`). It yields chunks tagged with the shard (`__shard`) and each
row's index in it (`__row`), all with the same columns whatever the shard's own schema
(the id columns stay behind; the driver reads them when it commits). When the shard cannot
be read it yields one marker row instead: `__row` -1 and the reason in `__fatal`. A store
error while reading the file is retried with backoff by reopening the file where the read
stopped, so no row is sent twice.
"""

from __future__ import annotations

import bisect
import logging
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models import ModelRef, load_processor
from ..storage.pixels import pack_arrays
from ..storage import Location, Storage, TransientStorageError, describe_error, parse_uri
from .assembly import ROW
from .predictor import FATAL
from .preprocess import column_cells, prepare_cells, with_pixels

log = logging.getLogger(__name__)
SHARD = "__shard"
# Bytes read ahead per column chunk: Parquet pages stream through this instead of a whole
# column chunk (a 1M-row single-row-group shard would otherwise load its whole image column).
READ_BUFFER_BYTES = 4 << 20


class ShardReadError(Exception):
    """A shard could not be read. `transient`: the store failed (a rerun may succeed);
    otherwise the shard itself is bad (unreadable, changed since planning)."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries with its flag
        return (ShardReadError, (str(self), self.transient))


def iter_shard_batches(
    uri: str,
    *,
    proc: Any,
    storage: Storage,
    image_column: str,
    num_rows: int,
    batch_rows: int,
    max_pixels: int,
    retries: int,
    wanted: np.ndarray | None = None,
    sleep=time.sleep,
) -> Iterator[pa.Table]:
    """Tables of at most `batch_rows` rows: `__row` (index in the shard), `error` and the
    pixel columns. With `wanted`, only those row indices."""
    loc = parse_uri(uri)
    base = Location(loc.scheme, posixpath.dirname(loc.path))
    want = None
    if wanted is not None:
        want = np.zeros(num_rows, dtype=bool)
        want[np.asarray(wanted, dtype=np.int64)] = True
    offset, failures = 0, 0  # rows of the shard done (yielded or skipped); store errors so far
    pending: list[pa.Table] = []
    while True:
        try:
            with storage.filesystem(loc).open_input_file(loc.path) as f:
                reader = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
                meta = reader.metadata
                if meta.num_rows != num_rows:
                    raise ShardReadError(f"has {meta.num_rows} rows, {num_rows} when the job was planned; "
                                         "it changed during the run", transient=False)
                starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]).tolist()
                first = max(0, bisect.bisect_right(starts, offset) - 1)
                skip = offset - starts[first]  # rows of that row group done before a reopen
                for rb in reader.iter_batches(batch_size=batch_rows, columns=[image_column], use_threads=False,
                                              row_groups=range(first, meta.num_row_groups)):
                    if skip:
                        cut = min(skip, rb.num_rows)
                        rb, skip = rb.slice(cut), skip - cut
                        if rb.num_rows == 0:
                            continue
                    read = rb.num_rows
                    rows = np.arange(offset, offset + read, dtype=np.int64)
                    if want is not None:
                        keep = want[rows]
                        rb, rows = rb.filter(pa.array(keep)), rows[keep]
                    if rows.size:
                        cells = column_cells(rb.column(0))
                        arrays, errors = prepare_cells(cells, proc, storage=storage, base=base, max_pixels=max_pixels,
                                                       retries=retries, rows=rows.tolist())
                        pending.append(with_pixels(pa.table({ROW: pa.array(rows, type=pa.int64())}), arrays, errors))
                    offset += read
                    if sum(t.num_rows for t in pending) >= batch_rows:  # only sparse (retry_errors) reads gather several
                        yield pa.concat_tables(pending)
                        pending = []
            break
        except ShardReadError:
            raise
        except TransientStorageError as exc:  # an image path's store stayed down through its retries
            raise ShardReadError(f"{exc} (after {retries} retries)", transient=True) from None
        except Exception as exc:  # noqa: BLE001 - classified: store trouble is retried, the rest is the shard's
            err = describe_error(exc, "reading")
            detail = str(err).removeprefix("reading: ")
            if isinstance(err, TransientStorageError) and failures < retries:
                failures += 1
                wait = min(16.0, 2.0 ** (failures - 1))
                log.warning("%s: %s; reading on from row %d in %.0f s (retry %d of %d)", uri, detail, offset, wait,
                            failures, retries)
                sleep(wait)
                continue
            after = f" (after {retries} retries)" if isinstance(err, TransientStorageError) else ""
            raise ShardReadError(f"reading shard failed after {offset} rows: {detail}{after}",
                                 transient=isinstance(err, TransientStorageError)) from None
    if pending:
        yield pa.concat_tables(pending)
    if offset != num_rows:
        raise ShardReadError(f"gave {offset} rows, its footer says {num_rows}", transient=False)


def _tagged(table: pa.Table, shard: int) -> pa.Table:
    table = table.add_column(0, SHARD, pa.array(np.full(table.num_rows, shard, dtype=np.int64)))
    return table.append_column(FATAL, pa.nulls(table.num_rows, type=pa.string()))


def marker(shard: int, reason: str) -> pa.Table:
    """The one row that tells the driver its shard failed, and why."""
    table = pa.table({SHARD: pa.array([shard], pa.int64()), ROW: pa.array([-1], pa.int64()),
                      "error": pa.array([None], pa.string())})
    for name, column in pack_arrays([None]).items():
        table = table.append_column(name, column)
    return table.append_column(FATAL, pa.array([reason], pa.string()))


def read_shards(batch: pa.Table, *, model: ModelRef, storage: Storage, cache_dir: str | None, image_column: str,
                batch_rows: int, max_pixels: int, retries: int) -> Iterator[pa.Table]:
    """map_batches generator over planned shards (one per call): chunks, or a marker."""
    for item in batch.to_pylist():
        shard = int(item["shard"])
        wanted = np.asarray(item["wanted"], dtype=np.int64) if item["selected"] else None
        try:
            proc = load_processor(model, storage, cache_dir)
            for table in iter_shard_batches(item["uri"], proc=proc, storage=storage, image_column=image_column,
                                            num_rows=int(item["rows"]), batch_rows=batch_rows, max_pixels=max_pixels,
                                            retries=retries, wanted=wanted):
                yield _tagged(table, shard)
        except ShardReadError as exc:
            yield marker(shard, str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. the processor cannot load: the shard fails, not the run
            yield marker(shard, str(describe_error(exc, "preparing to read")))
