"""Putting one shard's output back together from captioned chunks (no Ray here).

Chunks of a shard reach the driver in order (the job's dataset preserves order), but the
driver does not rely on it for correctness: a `ShardAssembly` takes each chunk's rows,
refuses a row index it has already seen or that the shard does not have, and says when
every wanted row is in; then `table()` gives the rows in input order. Only caption results
are held (row index, caption, error, token count), never pixels or images: this is what
bounds the driver's memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW = "__row"


class AssemblyError(Exception):
    """Rows came back that the shard cannot hold (a duplicate or an index out of range)."""


class ShardAssembly:
    """Rows of one shard attempt. `wanted` lists the row indices to collect (all rows of
    the shard, or only the rows being re-captioned with retry_errors)."""

    def __init__(self, num_rows: int, wanted: np.ndarray | None = None):
        self.num_rows = num_rows
        self.wanted = np.zeros(num_rows, dtype=bool)
        if wanted is None:
            self.wanted[:] = True
        else:
            self.wanted[np.asarray(wanted, dtype=np.int64)] = True
        self.expected = int(self.wanted.sum())
        self.seen = np.zeros(num_rows, dtype=bool)
        self.received = 0
        self.parts: list[pa.Table] = []

    @property
    def complete(self) -> bool:
        return self.received == self.expected

    def add(self, part: pa.Table) -> bool:
        """Take a batch's rows; True when the shard is now complete. A batch with any bad
        row index is refused whole (nothing of it is kept)."""
        rows = part.column(ROW).to_numpy()
        if rows.size:
            if rows.min() < 0 or rows.max() >= self.num_rows:
                raise AssemblyError(f"row index {int(rows.min())}..{int(rows.max())} is outside 0..{self.num_rows - 1}")
            if not self.wanted[rows].all():
                raise AssemblyError(f"row {int(rows[~self.wanted[rows]][0])} was not asked for")
            if self.seen[rows].any() or np.unique(rows).size != rows.size:
                dup = rows[self.seen[rows]] if self.seen[rows].any() else rows
                raise AssemblyError(f"row {int(dup[0])} arrived twice")
            self.seen[rows] = True
            self.received += int(rows.size)
            self.parts.append(part)
        return self.complete

    def table(self) -> pa.Table:
        """All collected rows, sorted by their index in the input shard."""
        if not self.complete:
            raise AssemblyError(f"only {self.received} of {self.expected} rows are in")
        if not self.parts:
            raise AssemblyError("no rows were collected")
        table = pa.concat_tables(self.parts, promote_options="permissive")
        self.parts = [table]
        return table.sort_by(ROW)


def replace_rows(committed: pa.Table, fresh: pa.Table) -> pa.Table:
    """A committed shard output with some rows redone (retry_errors): `fresh` carries the
    row indices (`__row`) of the rows it replaces and the columns it replaces in them (e.g.
    caption, error, num_tokens); every other row and column stays as committed."""
    if fresh.num_rows == 0:
        return committed
    rows = fresh.column(ROW).to_numpy()
    if rows.min() < 0 or rows.max() >= committed.num_rows:
        raise AssemblyError(f"replacement row {int(rows.max())} is outside the committed {committed.num_rows} rows")
    source = np.arange(committed.num_rows, dtype=np.int64)  # which table each output row comes from
    position = np.full(committed.num_rows, -1, dtype=np.int64)
    position[rows] = np.arange(rows.size)
    keep = position < 0
    columns = {}
    for name in committed.column_names:
        old = committed.column(name)
        if name not in fresh.column_names:
            columns[name] = old
            continue
        new = fresh.column(name).cast(old.type)
        merged = pa.concat_arrays([old.combine_chunks(), new.combine_chunks()])
        index = np.where(keep, source, committed.num_rows + position)
        columns[name] = pc.take(merged, pa.array(index))
    return pa.table(columns, schema=committed.schema)
