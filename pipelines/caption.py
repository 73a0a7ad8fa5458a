"""Batch captioning: plan → read → preprocess → predict → commit, streaming on Ray Data.

Exactly-once per shard. Every row carries its shard (`__shard`) and its index in that
shard (`__row`). The driver consumes the output stream, buffers rows per shard, and the
moment a shard holds all the rows its Parquet footer promised — each index 0..n-1 exactly
once — it writes the shard's output in one PUT, then its stats JSON (the commit marker).
How Ray Data splits, merges or reorders blocks does not matter, and rows of many shards
flow through one pipeline at once. A crash leaves finished shards committed and the rest
without a marker; a rerun redoes exactly those, overwriting any half-written object.

Planning does all checks that can fail for a bad spec (locations, credentials, columns,
model location, write access) before Ray starts or any model code is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.specs import CaptionSpec, SpecError, public_dump

from .predictor import (ACTOR, IMAGE_BYTES, IMAGE_PATH, ROW, SHARD, CaptionPredictor, ModelRef, preprocess_batch,
                        resolve_model_ref)
from .shards import find_shards
from .storage import Location, Storage, StorageError, parquet_bytes, parse_uri

log = logging.getLogger(__name__)

STATS_DIR = "_stats"
SUMMARY = "_SUMMARY.json"
RUN = "_RUN.json"
# Spec fields that change what a caption says; a rerun into the same output must match.
_FINGERPRINT_FIELDS = ("model", "prompt", "generation", "image_column", "id_columns", "dtype")


@dataclass
class Shard:
    uri: str  # input object (as rows carry it in `__shard`)
    rel: str  # name relative to the input base; the output object has the same name
    rows: int
    out: Location
    stats: Location
    schema: pa.Schema  # output schema: id columns with this shard's types + caption columns


@dataclass
class CaptionPlan:
    spec: CaptionSpec
    storage: Storage
    model: ModelRef
    output: Location
    shards: list[Shard]
    todo: list[Shard]
    fingerprint: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)


def fingerprint(spec: CaptionSpec) -> str:
    data = {k: v for k, v in public_dump(spec).items() if k in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _output_schema(spec: CaptionSpec, shard_schema: pa.Schema, uri: str) -> pa.Schema:
    names = shard_schema.names
    for col, fld in [(spec.image_column, "image_column")] + [(c, "id_columns") for c in spec.id_columns]:
        if col not in names:
            raise SpecError(fld, f"column {col!r} is not in {uri}; its columns are {names}")
    itype = shard_schema.field(spec.image_column).type
    if not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype) or pa.types.is_string(itype)
            or pa.types.is_large_string(itype) or pa.types.is_binary_view(itype) or pa.types.is_string_view(itype)):
        raise SpecError("image_column", f"column {spec.image_column!r} in {uri} has type {itype}; "
                        "expected encoded image bytes or path/URI strings")
    fields = [shard_schema.field(c) for c in spec.id_columns]
    fields += [pa.field("caption", pa.string()), pa.field("error", pa.string()),
               pa.field("num_tokens", pa.int32()), pa.field("model", pa.string())]
    return pa.schema(fields)


def plan_caption(spec: CaptionSpec, *, claim: bool = True) -> CaptionPlan:
    """Every check a bad spec can fail, with the field named; no Ray, no model code.
    With `claim`, also record this run in the output (which proves write access)."""
    try:
        storage = Storage.from_environment(spec.storage.endpoint_url, spec.storage.region)
    except StorageError as exc:
        raise SpecError("storage", str(exc)) from None
    try:
        base, found, selects = find_shards(spec.input, storage)
    except StorageError as exc:
        raise SpecError("input", str(exc)) from None
    try:
        output = parse_uri(spec.output.rstrip("/") or "/")
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None
    out_rel = posixpath.relpath(output.path, base.path) if output.scheme == base.scheme else ".."
    if not out_rel.startswith("..") and any(
        selects(posixpath.normpath(posixpath.join(out_rel, posixpath.relpath(f.path, base.path)))) for f in found
    ):
        raise SpecError("output", f"{output.uri} is inside the input {spec.input}; a rerun would read its own "
                        "output as input; choose an output outside it")
    if not found:
        raise SpecError("input", f"no Parquet shards at {spec.input}")

    def footer(loc: Location) -> pq.FileMetaData:
        return storage.parquet_metadata(loc)

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:  # footers are tiny; latency dominates
            metas = list(pool.map(footer, found))
    except StorageError as exc:
        raise SpecError("input", str(exc)) from None
    try:
        existing = {f.path for f in storage.list_files(output)} if storage.is_dir(output) else set()
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None
    shards = []
    for loc, meta in zip(found, metas):
        rel = posixpath.relpath(loc.path, base.path)
        shards.append(Shard(loc.uri, rel, meta.num_rows, output.join(rel), output.join(STATS_DIR, rel + ".json"),
                            _output_schema(spec, meta.schema.to_arrow_schema(), loc.uri)))
    try:  # rows of different shards share blocks: their id column types must combine
        pa.unify_schemas([s.schema for s in shards], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        kinds = {c: sorted({str(s.schema.field(c).type) for s in shards}) for c in spec.id_columns}
        raise SpecError("id_columns", "types differ between shards and cannot be combined: "
                        + ", ".join(f"{c} is {' / '.join(t)}" for c, t in kinds.items() if len(t) > 1)) from None
    done = {s.rel for s in shards if s.out.path in existing and s.stats.path in existing}
    try:
        model = resolve_model_ref(spec.model, storage)
    except StorageError as exc:
        raise SpecError("model", str(exc)) from None
    plan = CaptionPlan(spec, storage, model, output, shards, [s for s in shards if s.rel not in done],
                       fingerprint(spec))
    _check_output(plan, has_done=bool(done), claim=claim)
    return plan


def _check_output(plan: CaptionPlan, has_done: bool, claim: bool) -> None:
    """Refuse to mix captions of different specs in one output; prove write access early."""
    run = plan.output.join(RUN)
    try:
        if has_done and plan.storage.exists(run):
            before = plan.storage.read_json(run)
            if before.get("fingerprint") != plan.fingerprint:
                changed = [k for k in _FINGERPRINT_FIELDS if before.get("spec", {}).get(k) != public_dump(plan.spec)[k]]
                raise SpecError("output", f"{plan.output.uri} holds captions made with a different "
                                f"{', '.join(changed) or 'spec'}; use a new output or remove the old one")
        if claim:
            plan.storage.write_json(run, {"run_id": plan.run_id, "fingerprint": plan.fingerprint,
                                          "started_at": _now(), "spec": public_dump(plan.spec)})
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the Ray Data pipeline -------------------------------------------------------------------


def read_shards(
    batch: pa.Table, *, storage: Storage, image_column: str, id_columns: list[str], chunk_rows: int
) -> Iterator[pa.Table]:
    """Stream shards in chunks, tagging rows with (shard, index). A shard that cannot be
    read yields one marker row (`__row` = -1, `error` set) so the job goes on without it."""
    columns = list(dict.fromkeys([image_column, *id_columns]))
    for uri in batch.column("uri").to_pylist():
        loc, offset = parse_uri(uri), 0
        try:
            with storage.filesystem(loc).open_input_file(loc.path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows, columns=columns):
                    n = rb.num_rows
                    table = _split_image(pa.Table.from_batches([rb]), image_column, id_columns)
                    yield _tag(table, uri, np.arange(offset, offset + n), [None] * n)
                    offset += n
        except Exception as exc:
            err = f"reading shard failed after {offset} rows: {type(exc).__name__}: {str(exc)[:300]}"
            # Null-typed columns: they unify with whatever types the other blocks have.
            nulls = pa.table({c: pa.nulls(1) for c in id_columns})
            nulls = nulls.append_column(IMAGE_BYTES, pa.nulls(1, pa.large_binary()))
            yield _tag(nulls.append_column(IMAGE_PATH, pa.nulls(1, pa.large_string())), uri, np.array([-1]), [err])


def _split_image(table: pa.Table, image_column: str, id_columns: list[str]) -> pa.Table:
    """Bytes and path strings go to separate typed columns, so blocks of shards that store
    the image differently (binary, large_binary, string) still concatenate."""
    col, n = table.column(image_column), table.num_rows
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
        data, path = pa.nulls(n, pa.large_binary()), col.cast(pa.large_string())
    else:
        data, path = col.cast(pa.large_binary()), pa.nulls(n, pa.large_string())
    if image_column not in id_columns:
        table = table.drop_columns([image_column])
    return table.append_column(IMAGE_BYTES, data).append_column(IMAGE_PATH, path)


def _tag(table: pa.Table, uri: str, rows: np.ndarray, errors: list[str | None]) -> pa.Table:
    table = table.append_column(SHARD, pa.array([uri] * table.num_rows, type=pa.string()))
    table = table.append_column(ROW, pa.array(rows, type=pa.int64()))
    return table.append_column("error", pa.array(errors, type=pa.string()))


def build_dataset(plan: CaptionPlan, shards: list[Shard]) -> Any:
    import ray.data

    spec = plan.spec
    # One read task per shard, up to a cap past which a task reads several shards in turn.
    ds = ray.data.from_items([{"uri": s.uri} for s in shards], override_num_blocks=min(len(shards), 1000))
    # Chunks of a few batches: a shard enters the pipeline piece by piece, not at once.
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"storage": plan.storage, "image_column": spec.image_column,
                                   "id_columns": spec.id_columns, "chunk_rows": 4 * spec.batch_size})
    # Reads merge small files into big blocks; one block feeds one actor call at a time, so
    # cut blocks to a batch each to let every CPU task and every predictor actor take work.
    ds = ds.repartition(target_num_rows_per_block=spec.batch_size)
    # With GPU actors, decoding and preprocessing run in CPU tasks so the GPUs only
    # generate. Without GPUs both stages compete for the same cores anyway, so the actor
    # preprocesses its own batches (what Ray's operator fusion does when the two stages'
    # resources match, made explicit): no second copy of the processor per CPU worker.
    in_actor = spec.gpus_per_actor == 0
    if not in_actor:
        ds = ds.map_batches(preprocess_batch, batch_size=spec.batch_size, batch_format="pyarrow",
                            fn_kwargs={"model": plan.model, "storage": plan.storage,
                                       "cache_dir": spec.model_cache_dir, "max_pixels": spec.max_image_pixels})
    return ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={
            "model": plan.model, "model_id": spec.model, "storage": plan.storage,
            "cache_dir": spec.model_cache_dir, "dtype": spec.dtype,
            "device": "cpu" if spec.gpus_per_actor == 0 else None,
            "prompt": spec.prompt, "generation": spec.generation.model_dump(),
            "preprocess_max_pixels": spec.max_image_pixels if in_actor else None,
        },
        compute=ray.data.ActorPoolStrategy(size=spec.actors),
        num_gpus=spec.gpus_per_actor, num_cpus=spec.cpus_per_actor,
        batch_size=spec.batch_size, batch_format="pyarrow",
    )


# --- commit ----------------------------------------------------------------------------------


def commit_shard(plan: CaptionPlan, shard: Shard, parts: list[pa.Table]) -> dict[str, Any]:
    """Write one shard's output (one PUT), then its stats JSON, which marks it done."""
    table = pa.concat_tables(parts, promote_options="permissive") if parts else shard.schema.empty_table()
    if parts:
        rows = np.sort(table.column(ROW).to_numpy())
        if not np.array_equal(rows, np.arange(shard.rows)):
            raise RuntimeError(f"{shard.uri}: rows do not match its {shard.rows}-row footer; not committed")
        table = table.sort_by(ROW)
    out = table.select(shard.schema.names).cast(shard.schema)
    plan.storage.write_bytes(shard.out, parquet_bytes(out))
    stats = {
        "input": shard.uri, "output": shard.out.uri, "rows": out.num_rows,
        "errors": out.num_rows - pc.count(out.column("error"), mode="only_null").as_py(),
        "num_tokens": int(pc.sum(out.column("num_tokens")).as_py() or 0),
        "model": plan.spec.model, "fingerprint": plan.fingerprint, "run_id": plan.run_id, "committed_at": _now(),
    }
    plan.storage.write_json(shard.stats, stats)
    return stats


def execute_caption(plan: CaptionPlan) -> dict[str, Any]:
    """Run the pipeline for the shards still to do; write and return the job summary.
    If the pipeline itself dies (say, the model cannot load), shards committed so far stay
    committed, the summary records the abort, and the error is raised again."""
    t_start = time.time()
    committed: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    per_actor: Counter[str] = Counter()
    first_out = t_end = None
    rows_after_first = 0
    aborted: BaseException | None = None
    with ThreadPoolExecutor(max_workers=4) as writers:  # uploads overlap the stream
        pending: dict[str, Future[dict[str, Any]]] = {}
        for shard in (s for s in plan.todo if s.rows == 0):
            pending[shard.rel] = writers.submit(commit_shard, plan, shard, [])
        work = [s for s in plan.todo if s.rows > 0]
        by_uri = {s.uri: s for s in work}
        buffers: dict[str, list[pa.Table]] = defaultdict(list)
        counts: Counter[str] = Counter()
        try:
            for batch in (build_dataset(plan, work).iter_batches(batch_size=None, batch_format="pyarrow")
                          if work else []):
                if first_out is None:
                    first_out = time.time()
                else:
                    rows_after_first += batch.num_rows
                for item in pc.value_counts(batch.column(ACTOR)).to_pylist():
                    per_actor[item["values"]] += item["counts"]
                for uri in pc.unique(batch.column(SHARD)).to_pylist():
                    part = batch.filter(pc.equal(batch.column(SHARD), uri))
                    shard = by_uri[uri]
                    if uri in failed or shard.rel in pending:  # late marker of a complete shard
                        continue
                    marker = part.filter(pc.less(part.column(ROW), 0))
                    if marker.num_rows:
                        failed[uri] = marker.column("error")[0].as_py()
                        buffers.pop(uri, None)
                        continue
                    buffers[uri].append(part)
                    counts[uri] += part.num_rows
                    if counts[uri] == shard.rows:
                        pending[shard.rel] = writers.submit(commit_shard, plan, shard, buffers.pop(uri))
                    elif counts[uri] > shard.rows:
                        failed[uri] = f"received {counts[uri]} rows for a {shard.rows}-row shard"
                        buffers.pop(uri, None)
        except Exception as exc:
            aborted = exc
        t_end = time.time()
        for uri in set(by_uri) - set(failed) - {s.uri for s in work if s.rel in pending}:
            failed[uri] = "not finished: the pipeline stopped" if aborted else (
                f"only {counts[uri]} of {by_uri[uri].rows} rows came back")
        for rel, fut in pending.items():
            try:
                committed.append(fut.result())
            except Exception as exc:
                uri = next(s.uri for s in plan.todo if s.rel == rel)
                failed[uri] = f"commit failed: {exc}"
    summary = _summarize(plan, committed, failed, per_actor, t_start, first_out, t_end, rows_after_first)
    if aborted is not None:
        summary["aborted"] = f"{type(aborted).__name__}: {str(aborted).strip().splitlines()[-1][:500]}"
        plan.storage.write_json(plan.output.join(SUMMARY), summary)
        raise aborted
    return summary


def _summarize(plan: CaptionPlan, committed: list[dict[str, Any]], failed: dict[str, str],
               per_actor: Counter[str], t_start: float, first_out: float | None, t_end: float,
               rows_after_first: int) -> dict[str, Any]:
    rows_out = sum(c["rows"] for c in committed)
    tokens = sum(c["num_tokens"] for c in committed)
    seconds = max(t_end - t_start, 1e-9)
    steady = (t_end - first_out) if first_out and t_end > first_out else None
    summary = {
        "run_id": plan.run_id, "output": plan.output.uri, "finished_at": _now(),
        "shards_total": len(plan.shards), "shards_skipped": len(plan.shards) - len(plan.todo),
        "shards_committed": len(committed), "shards_failed": len(failed),
        "failed": {k: v for k, v in sorted(failed.items())[:100]},
        "rows_in": sum(s.rows for s in plan.todo), "rows_out": rows_out,
        "rows_skipped": sum(s.rows for s in plan.shards) - sum(s.rows for s in plan.todo),
        "errors": sum(c["errors"] for c in committed), "num_tokens": tokens,
        "wall_seconds": round(time.time() - plan.started, 3), "pipeline_seconds": round(seconds, 3),
        "startup_seconds": round(first_out - t_start, 3) if first_out else None,
        "images_per_s": round(rows_out / seconds, 3), "tokens_per_s": round(tokens / seconds, 3),
        "steady_images_per_s": round(rows_after_first / steady, 3) if steady else None,
        "rows_per_actor": dict(per_actor), "spec": public_dump(plan.spec),
    }
    plan.storage.write_json(plan.output.join(SUMMARY), summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"caption run {summary['run_id']} → {summary['output']}",
        f"  shards: {summary['shards_committed']} committed, {summary['shards_skipped']} already done, "
        f"{summary['shards_failed']} failed (of {summary['shards_total']})",
        f"  rows: {summary['rows_out']} written of {summary['rows_in']}, {summary['errors']} with errors",
    ]
    if summary["rows_out"]:
        lines.append(
            f"  speed: {summary['images_per_s']} images/s, {summary['tokens_per_s']} tokens/s over "
            f"{summary['pipeline_seconds']} s (startup {summary['startup_seconds']} s, then "
            f"{summary['steady_images_per_s']} images/s)"
        )
    lines.append(f"  wall: {summary['wall_seconds']} s; summary in {summary['output']}/{SUMMARY}")
    lines += [f"  FAILED {uri}: {why}" for uri, why in summary["failed"].items()]
    return "\n".join(lines)


def run_caption(spec: CaptionSpec) -> dict[str, Any]:
    """Plan (fails fast on a bad spec), then caption what is not done yet."""
    return execute_caption(plan_caption(spec))

