"""Micro-batches made by Ray Data CPU tasks, delivered to a training worker ready to step.

A worker's epoch plan (`plan`) becomes a small dataset of row ids, one micro-batch per
`batch_size` consecutive rows. A CPU task per micro-batch reads just those rows from their
Parquet row groups, decodes and resizes the images (kept uint8), tokenises and pads to the
micro-batch's own width. The worker's iterator stacks the columns into tensors, pins them and
copies them to the device in Ray's prefetch thread: the training loop only steps.
"""

from __future__ import annotations

import pickle
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Storage, parse_uri
from .data import COUNTER_NAMES, DataCounters, RowFormat, encode_row
from .plan import EMPTY_SLOT, RowIndex

USED = -1  # `drop` column: the row trains (else the index of its reason in COUNTER_NAMES)


class BatchRecipe:
    """Everything a data task needs (pickled once per dataset by Ray Data).

    The processor travels as its own pickle, opened on first use: Ray Data's split
    coordinator, which only passes the recipe on, then never imports the processor's
    transformers and torch (about 3 s of CPU in every such actor, one per pipeline)."""

    def __init__(self, index: RowIndex, columns: list[str], fmt: RowFormat, processor: Any, storage: Storage):
        self.index, self.columns, self.fmt, self.storage = index, columns, fmt, storage
        self._processor, self._pickled_processor = processor, None

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._processor = pickle.loads(self._pickled_processor)
        return self._processor

    def __getstate__(self) -> dict[str, Any]:
        if self._pickled_processor is None:  # once, however often Ray Data pickles the recipe
            self._pickled_processor = pickle.dumps(self._processor, protocol=pickle.HIGHEST_PROTOCOL)
        return {**self.__dict__, "_processor": None}


# Row groups recently read by this process: consecutive micro-batches of a shuffle window
# mostly hit the same few groups.
_GROUPS: OrderedDict[tuple[str, int, tuple[str, ...]], pa.Table] = OrderedDict()
_GROUP_CACHE_SIZE = 4


def _row_group(recipe: BatchRecipe, shard: int, group: int) -> pa.Table:
    import pyarrow.parquet as pq

    path = recipe.index.shard_paths[shard]
    key = (path, group, tuple(recipe.columns))
    if key in _GROUPS:
        _GROUPS.move_to_end(key)
        return _GROUPS[key]
    loc = parse_uri(path)
    with recipe.storage.filesystem(loc).open_input_file(loc.path) as f:
        table = pq.ParquetFile(f).read_row_group(group, columns=recipe.columns)
    _GROUPS[key] = table
    while len(_GROUPS) > _GROUP_CACHE_SIZE:
        _GROUPS.popitem(last=False)
    return table


def read_rows(recipe: BatchRecipe, rows: np.ndarray) -> list[dict[str, Any] | None]:
    """The rows with these global ids, as dicts (None for empty slots), order kept."""
    out: list[dict[str, Any] | None] = [None] * len(rows)
    real = np.flatnonzero(rows != EMPTY_SLOT)
    if not len(real):
        return out
    shards, groups, offsets = recipe.index.locate(rows[real])
    for shard, group in sorted(set(zip(shards.tolist(), groups.tolist()))):
        picked = np.flatnonzero((shards == shard) & (groups == group))
        table = _row_group(recipe, shard, group).take(pa.array(offsets[picked]))
        for slot, row in zip(real[picked], table.to_pylist()):
            out[slot] = row
    return out


def prepare_micro_batch(refs: pa.Table, recipe: BatchRecipe) -> pa.Table:
    """Ray Data stage: one micro-batch of row ids → its encoded rows, padded to one width.

    Empty slots and dropped rows stay as one-token rows without labels, so every
    micro-batch keeps `batch_size` rows and the worker's batches align with the plan."""
    processor, fmt = recipe.processor, recipe.fmt
    rows = refs.column("row").to_numpy()
    encoded, drops, truncated, pixels = [], [], [], []
    for row in read_rows(recipe, rows):
        item, reason, counters = None, USED, DataCounters()
        if row is not None:
            item = encode_row(row, processor, fmt, counters, recipe.storage)
            if item is None:
                reason = next(i for i, name in enumerate(COUNTER_NAMES) if name.startswith("dropped") and counters.counts[name])
        encoded.append(item[0] if item else None)
        pixels.append(item[1] if item and item[1] is not None else None)
        drops.append(reason)
        truncated.append(bool(item and item[0]["truncated"]))
    width = max([len(e["input_ids"]) for e in encoded if e] + [1])
    pad = processor.tokenizer.pad_token_id
    ids, labels, lengths = [], [], []
    for e in encoded:
        n = len(e["input_ids"]) if e else 1
        ids.append((e["input_ids"] if e else [pad]) + [pad] * (width - n))
        labels.append((e["labels"] if e else [-100]) + [-100] * (width - n))
        lengths.append(n)
    return pa.table({
        "micro": refs.column("micro"),
        "row": pa.array(rows, pa.int64()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "labels": pa.array(labels, pa.list_(pa.int32())),
        "length": pa.array(lengths, pa.int32()),
        "pixels": pa.array([p.tobytes() if p is not None else None for p in pixels], pa.binary()),
        "tiles": pa.array([p.shape[0] if p is not None else 0 for p in pixels], pa.int32()),
        "drop": pa.array(drops, pa.int8()),
        "truncated": pa.array(truncated, pa.bool_()),
    })


def plan_dataset(plan: np.ndarray, recipe: BatchRecipe, *, rows_per_block: int = 256, tasks: int = 1):
    """A Ray Dataset of prepared micro-batches in plan order (None for an empty plan).

    The CPUs its tasks use are reserved with the training worker, in the worker's
    placement-group bundle (finetune: cpus_per_worker + data_tasks_per_worker x
    data_cpus_per_task), so the tasks claim none themselves: at most `tasks` run at once,
    on this process's node. Tasks that claimed CPUs of their own would queue behind
    whatever else holds the cluster's free CPUs, and training would wait with them."""
    import ray
    import ray.data

    if plan.size == 0:
        return None
    batch_size = plan.shape[1]
    micro = np.repeat(np.arange(plan.shape[0], dtype=np.int64), batch_size)
    flat = plan.reshape(-1)
    step = max(1, rows_per_block // batch_size) * batch_size  # blocks hold whole micro-batches
    tables = [pa.table({"micro": micro[i:i + step], "row": flat[i:i + step]}) for i in range(0, len(flat), step)]
    ds = ray.data.from_blocks(tables)  # built here: from_arrow would run 1-CPU metadata tasks
    # This dataset's own context (a copy): the plan's order must survive the streaming
    # executor. No tqdm bars (one per worker per epoch would flood the log): progress goes
    # to Ray Data's logger at INFO, which a finetune job's workers keep at WARNING. (Turning
    # the bars off instead makes Ray Data warn about that in every process.)
    ds.context.execution_options.preserve_order = True
    ds.context.use_ray_tqdm = False
    here = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}  # as Ray Data pins its coordinator
    return ds.map_batches(prepare_micro_batch, batch_size=batch_size, batch_format="pyarrow",
                          fn_kwargs={"recipe": recipe}, compute=ray.data.TaskPoolStrategy(size=tasks),
                          num_cpus=0, label_selector=here)


def _stack(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    flat = pc.list_flatten(column.combine_chunks()).to_numpy()
    if flat.size % rows:
        raise RuntimeError("a delivered batch mixes micro-batches of different widths (plan misaligned)")
    return flat.reshape(rows, -1)


def _collate_base():
    from ray.data.collate_fn import ArrowBatchCollateFn

    return ArrowBatchCollateFn


class MicroBatchCollate(_collate_base()):
    """One prepared micro-batch (pyarrow) → tensors. Runs in Ray's prefetch thread."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        import torch

        rows = table.num_rows
        if len(pc.unique(table.column("micro"))) != 1:
            raise RuntimeError("a delivered batch spans two micro-batches (plan misaligned)")
        lengths = table.column("length").to_numpy()
        width = _stack(table.column("input_ids"), rows).shape[1]
        batch = {
            "input_ids": torch.from_numpy(_stack(table.column("input_ids"), rows).astype(np.int64)),
            "labels": torch.from_numpy(_stack(table.column("labels"), rows).astype(np.int64)),
            "attention_mask": torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)),
            "rows": torch.from_numpy(table.column("row").to_numpy().astype(np.int64)),
            "micro": torch.tensor(int(table.column("micro")[0].as_py())),
            "counters": torch.from_numpy(_counter_values(table)),
        }
        present = [p for p in table.column("pixels").to_pylist() if p is not None]
        if present:
            s = self.image_size
            batch["pixel_values"] = torch.from_numpy(np.frombuffer(b"".join(present), dtype=np.uint8).reshape(-1, 3, s, s).copy())
        return batch


def _counter_values(table: pa.Table) -> np.ndarray:
    """This micro-batch's data counters, in COUNTER_NAMES order (empty slots count nothing)."""
    rows = table.column("row").to_numpy()
    drop = table.column("drop").to_numpy()
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    real = rows != EMPTY_SLOT
    counts = np.zeros(len(COUNTER_NAMES), dtype=np.int64)
    counts[COUNTER_NAMES.index("rows_used")] = int(np.sum(real & (drop == USED)))
    counts[COUNTER_NAMES.index("truncated")] = int(np.sum(real & truncated))
    for i, name in enumerate(COUNTER_NAMES):
        if name.startswith("dropped"):
            counts[i] = int(np.sum(real & (drop == i)))
    return counts


class TimedBatches:
    """Micro-batches of a plan, on the device. `wait_seconds` is the time spent blocked on
    data once the pipeline runs (Ray prefetches the next batches while a step runs);
    `startup_seconds` the wait for the first batch, while the pipeline starts."""

    def __init__(self, plan: np.ndarray, recipe: BatchRecipe, device: Any, *, prefetch: int = 8,
                 tasks: int = 1, own_executor: bool = True):
        self.wait_seconds = self.startup_seconds = 0.0
        self._started, self._expected = False, 0
        ds = plan_dataset(plan, recipe, tasks=tasks)
        # A one-way split runs the streaming executor in its own Ray actor, not in this
        # training process, where its scheduling loop would compete with the step for the GIL.
        # Short pipelines (evaluation) skip it: starting that actor costs more than it saves.
        source = ds if ds is None or not own_executor else ds.streaming_split(1, equal=False)[0]
        self._it: Iterator[dict[str, Any]] = iter(()) if source is None else iter(source.iter_torch_batches(
            batch_size=plan.shape[1], collate_fn=MicroBatchCollate(recipe.processor.image_size),
            prefetch_batches=prefetch, device="cpu", pin_memory=getattr(device, "type", "cpu") == "cuda"))
        self._device = device

    def next(self) -> dict[str, Any] | None:
        started = time.perf_counter()
        batch = next(self._it, None)
        if batch is not None:
            if int(batch.pop("micro")) != self._expected:  # the plan's order is what resume relies on
                raise RuntimeError(f"micro-batch {self._expected} of the plan arrived out of order")
            self._expected += 1
            # Pinned host memory → device without waiting: the copy queues ahead of the step.
            batch = {k: v.to(self._device, non_blocking=True) for k, v in batch.items()}
        if self._started:
            self.wait_seconds += time.perf_counter() - started
        else:
            self.startup_seconds += time.perf_counter() - started
            self._started = True
        return batch
