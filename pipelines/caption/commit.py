"""Committing one shard: its output object in one PUT, then its stats, which mark it done.

Exactly once per shard: the output is written only when all the shard's rows are in, then
the stats JSON, which is the commit marker (and what a rerun verifies). A crash leaves
committed shards as they are and the rest without a marker; a rerun redoes those,
overwriting any half-written object. The output object is never visible incomplete.

The pipeline carries only what captioning needs (row index, caption, error, token count),
so the id columns come from the input itself here, with their exact types, after checking
that the input is still the one planned.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage.images import describe_exception
from ..storage import parquet_bytes, parse_uri, with_retries
from .assembly import ROW, AssemblyError, replace_rows
from .plan import CaptionPlan, Shard, now_iso
from .read import READ_BUFFER_BYTES

log = logging.getLogger(__name__)


def _input_ids(plan: CaptionPlan, shard: Shard, attempts: int) -> pa.Table:
    """The shard's id columns, read from the input once it is proven unchanged."""
    loc = parse_uri(shard.uri)
    now = with_retries(lambda: plan.storage.stat(loc), attempts=attempts, what=shard.uri)
    if (now.size, now.version) != (shard.identity.size, shard.identity.version):
        raise AssemblyError(f"{shard.uri} changed during the run (size or version); not committed, a rerun redoes it")
    columns = list(plan.spec.id_columns)

    def read() -> pa.Table:
        with plan.storage.filesystem(loc).open_input_file(loc.path) as f:
            return pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False).read(columns=columns,
                                                                                           use_threads=False)

    ids = with_retries(read, attempts=attempts, what=shard.uri) if columns else pa.table({})
    if columns and ids.num_rows != shard.rows:
        raise AssemblyError(f"{shard.uri} has {ids.num_rows} rows, {shard.rows} when planned; not committed")
    return ids


def commit_shard(plan: CaptionPlan, shard: Shard, table: pa.Table | None) -> dict[str, Any]:
    """Write one shard's output (one PUT), then its stats JSON, which marks it done.
    `table` holds the captioned rows (`__row`, caption, error, num_tokens) sorted by
    `__row`: all rows, or with retry_errors the rows redone, merged into the committed output."""
    attempts = plan.spec.transient_retries + 1
    if table is None:
        table = pa.table({ROW: pa.array([], pa.int64()), "caption": pa.array([], pa.string()),
                          "error": pa.array([], pa.string()), "num_tokens": pa.array([], pa.int32())})
    table = table.append_column("model", pa.array([plan.spec.model] * table.num_rows, type=pa.string()))
    if shard.wanted is not None:
        data = with_retries(lambda: plan.storage.read_bytes(shard.out), attempts=attempts, what=shard.out.uri)
        out = replace_rows(pq.read_table(io.BytesIO(data)), table)
    else:
        if table.num_rows != shard.rows or (
                table.num_rows and not np.array_equal(table.column(ROW).to_numpy(), np.arange(shard.rows))):
            raise AssemblyError(f"{shard.uri}: rows do not match its {shard.rows}-row footer; not committed")
        if shard.rows:
            ids = _input_ids(plan, shard, attempts)
            columns = {name: ids.column(name) for name in plan.spec.id_columns}
            columns.update({name: table.column(name) for name in ("caption", "error", "num_tokens", "model")})
            out = pa.table(columns).cast(shard.schema)
        else:
            out = shard.schema.empty_table()
    body = parquet_bytes(out)
    with_retries(lambda: plan.storage.write_bytes(shard.out, body), attempts=attempts, what=shard.out.uri)
    stats = {
        "input": shard.uri, "output": shard.out.uri, "rows": out.num_rows,
        "input_size": shard.identity.size, "input_version": shard.identity.version,
        "errors": out.num_rows - pc.count(out.column("error"), mode="only_null").as_py(),
        "num_tokens": int(pc.sum(out.column("num_tokens")).as_py() or 0),
        "rows_captioned": len(shard.wanted) if shard.wanted is not None else out.num_rows,
        "model": plan.spec.model, "model_identity": plan.model.identity, "fingerprint": plan.fingerprint,
        "run_id": plan.run_id, "committed_at": now_iso(),
    }
    with_retries(lambda: plan.storage.write_json(shard.stats, stats), attempts=attempts, what=shard.stats.uri)
    return stats


class Committer:
    """Commits shards in background threads, at most `depth` at once: the driver goes on
    assembling the next shard meanwhile, and waits (which holds back the pipeline) only
    when that many commits are still running."""

    def __init__(self, plan: CaptionPlan, depth: int = 2):
        self.plan, self.depth = plan, depth
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="caption-commit")
        self.running: deque[tuple[Shard, Future]] = deque()
        self.committed: list[dict[str, Any]] = []
        self.failed: dict[str, str] = {}

    def submit(self, shard: Shard, table: pa.Table | None) -> None:
        while len(self.running) >= self.depth:
            self._collect(self.running.popleft())
        self.running.append((shard, self.pool.submit(commit_shard, self.plan, shard, table)))
        while self.running and self.running[0][1].done():
            self._collect(self.running.popleft())

    def _collect(self, item: tuple[Shard, Future]) -> None:
        shard, future = item
        try:
            self.committed.append(future.result())
        except Exception as exc:  # noqa: BLE001 - the shard fails; a rerun redoes it
            log.error("shard %s: commit failed: %s", shard.uri, describe_exception(exc))
            self.failed[shard.uri] = f"commit failed: {describe_exception(exc)}"

    def close(self) -> None:
        while self.running:
            self._collect(self.running.popleft())
        self.pool.shutdown(wait=True)
