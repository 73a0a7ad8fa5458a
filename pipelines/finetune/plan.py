"""Which rows each worker trains on, in which order: a pure function of (seed, epoch, world).

Ray Data's streaming split hands blocks to whichever worker asks first, so the rows a worker
sees depend on timing and a resumed run cannot know which rows it already trained on. Here
the order is computed, not observed: row groups are shuffled as whole blocks, then rows are
shuffled inside windows of `shuffle_window` rows (the same two shuffles Ray Data's
randomize_block_order + local shuffle buffer give, but reproducible), and row i of the
epoch goes to worker i % world. A resumed run slices the plan past the micro-batches it
already consumed, so skipped rows are never read, let alone decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EMPTY_SLOT = -1  # a micro-batch slot with no row (the epoch's last, partial micro-batches)


@dataclass(frozen=True)
class RowIndex:
    """Every training row, numbered globally in shard order, with its Parquet row group."""

    shard_paths: tuple[str, ...]
    group_rows: tuple[tuple[int, ...], ...]  # per shard: rows in each row group

    @property
    def num_rows(self) -> int:
        return sum(sum(groups) for groups in self.group_rows)

    def group_starts(self) -> list[tuple[int, int, int, int]]:
        """(first global row, rows, shard, row group) for every row group, in shard order."""
        out, start = [], 0
        for shard, groups in enumerate(self.group_rows):
            for group, rows in enumerate(groups):
                out.append((start, rows, shard, group))
                start += rows
        return out

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global row ids → (shard, row group, row within that group)."""
        starts = self.group_starts()
        firsts = np.array([s[0] for s in starts], dtype=np.int64)
        which = np.searchsorted(firsts, rows, side="right") - 1
        shards = np.array([s[2] for s in starts], dtype=np.int64)[which]
        groups = np.array([s[3] for s in starts], dtype=np.int64)[which]
        return shards, groups, rows - firsts[which]


def epoch_order(index: RowIndex, seed: int, epoch: int, shuffle_window: int) -> np.ndarray:
    """All global row ids of one epoch, shuffled; the same for the same (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    blocks = index.group_starts()
    order = rng.permutation(len(blocks))
    rows = np.concatenate([np.arange(blocks[i][0], blocks[i][0] + blocks[i][1], dtype=np.int64) for i in order]) \
        if blocks else np.zeros(0, dtype=np.int64)
    if shuffle_window > 1:
        for start in range(0, len(rows), shuffle_window):
            window = rows[start:start + shuffle_window]
            rows[start:start + shuffle_window] = window[rng.permutation(len(window))]
    return rows


def micro_batches_per_worker(num_rows: int, world: int, batch_size: int, grad_accum: int) -> int:
    """Every worker runs the same number of micro-batches (a whole number of steps), so
    collectives line up; the few workers with a row less get empty slots instead."""
    rows_per_worker = math.ceil(num_rows / world)
    micro = math.ceil(rows_per_worker / batch_size)
    return math.ceil(micro / grad_accum) * grad_accum


def worker_plan(index: RowIndex, *, seed: int, epoch: int, rank: int, world: int, batch_size: int,
                grad_accum: int, shuffle_window: int) -> np.ndarray:
    """(micro-batches, batch_size) global row ids for one worker's epoch; EMPTY_SLOT pads."""
    rows = epoch_order(index, seed, epoch, shuffle_window)[rank::world]
    micro = micro_batches_per_worker(index.num_rows, world, batch_size, grad_accum)
    plan = np.full(micro * batch_size, EMPTY_SLOT, dtype=np.int64)
    plan[: len(rows)] = rows
    return plan.reshape(micro, batch_size)


def eval_plan(index: RowIndex, *, rank: int, world: int, batch_size: int, max_batches: int) -> np.ndarray:
    """Evaluation rows in file order, dealt round-robin, at most `max_batches` per worker."""
    rows = np.arange(index.num_rows, dtype=np.int64)[rank::world][: max_batches * batch_size]
    micro = min(max_batches, math.ceil(math.ceil(index.num_rows / world) / batch_size))
    plan = np.full(micro * batch_size, EMPTY_SLOT, dtype=np.int64)
    plan[: len(rows)] = rows
    return plan.reshape(micro, batch_size)
