"""Planning an evaluation (driver, no Ray, no model) and reading one benchmark shard into
the questions to ask (in a Ray task, but a plain function).

Planning does every check a bad spec can fail: the model location, each benchmark's
shards (footers only) and their columns. One unreadable shard does not stop the others;
it is reported in metrics.json, and the run's status is partial.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from ..models import ModelRef, resolve_model_ref
from ..storage.shards import find_shards
from ..specs import SpecError
from ..storage import Location, Storage, StorageError, parse_uri
from .benchmark_spec import BenchmarkSpec
from .rows import ASKED_COLUMNS, ask

SHARD_COLUMN = "__shard"  # which input shard an asked row came from; dropped when written
SHARD_FAILED = "__shard_failed"  # set on the one marker row of a shard that could not be read
ROW_COLUMN = "__row"  # the row's place in its shard: predictions keep the input order
READ_BATCH_ROWS = 64


@dataclass(frozen=True)
class ShardTask:
    """Read the first `rows` rows of one shard of benchmark `bench` (an index into the spec)."""

    bench: int
    uri: str
    rows: int
    columns: tuple[str, ...]


@dataclass
class EvaluationPlan:
    benchmarks: list[BenchmarkSpec]
    storage: Storage
    model: ModelRef
    output: Location
    tasks: list[ShardTask]
    unusable: dict[str, str] = field(default_factory=dict)  # shard uri → why it cannot be read
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)


def _wanted_columns(bench: BenchmarkSpec, names: set[str]) -> tuple[list[str], str | None]:
    """(columns to read, or the reason the shard cannot serve this benchmark)."""
    required = [bench.image_column, bench.question_column, bench.answer_column]
    missing = [c for c in required if c not in names]
    if missing:
        return [], f"no column {missing[0]!r} (columns are {sorted(names)})"
    optional = [bench.category_column, bench.hint_column, bench.id_column or "index", "id", bench.image_key_column]
    if bench.kind == "multiple_choice":
        if bench.choices_column in names:
            optional.append(bench.choices_column)
        elif {"A", "B"} <= names:
            optional += [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c in names]
        else:
            return [], f"multiple choice needs a {bench.choices_column!r} list column or option columns A, B, …"
    if bench.id_column and bench.id_column not in names:
        return [], f"no id column {bench.id_column!r} (id_column)"
    if bench.image_key_column and bench.image_key_column not in names:
        return [], f"no column {bench.image_key_column!r} (image_key_column)"
    return list(dict.fromkeys(required + [c for c in optional if c and c in names])), None


def plan_benchmarks(benchmarks: list[BenchmarkSpec], model: str, output: str, storage: Storage, *,
                    field_prefix: str = "", model_field: str = "model") -> EvaluationPlan:
    """Check everything a spec can get wrong; SpecError names the field (`field_prefix` and
    `model_field` place the benchmarks inside another spec, e.g. "evaluate." and "base_model")."""
    try:
        ref = resolve_model_ref(model, storage)
    except StorageError as exc:
        raise SpecError(model_field, str(exc)) from None
    try:
        out = parse_uri(output)
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None
    tasks, unusable = [], {}
    for i, bench in enumerate(benchmarks):
        where = f"{field_prefix}benchmarks.{i}"
        try:
            _, shards, _ = find_shards(bench.data, storage)
        except StorageError as exc:
            raise SpecError(f"{where}.data", str(exc)) from None
        if not shards:
            raise SpecError(f"{where}.data", f"no .parquet shards at {bench.data}")
        usable, reasons, left = 0, [], bench.limit
        for shard in shards:
            try:
                meta = storage.parquet_metadata(shard)
            except StorageError as exc:
                unusable[shard.uri] = str(exc)
                continue
            columns, problem = _wanted_columns(bench, set(meta.schema.to_arrow_schema().names))
            if problem:
                unusable[shard.uri] = problem
                reasons.append(problem)
                continue
            usable += 1
            rows = meta.num_rows if left is None else min(left, meta.num_rows)
            if rows:
                tasks.append(ShardTask(i, shard.uri, rows, tuple(columns)))
            if left is not None:
                left -= rows
                if left == 0:
                    break
        if not usable:
            why = reasons[0] if reasons else "no shard could be read"
            raise SpecError(f"{where}.data", f"{bench.name}: {why}")
    return EvaluationPlan(list(benchmarks), storage, ref, out, tasks, unusable)


def _marker(task: ShardTask, bench: BenchmarkSpec, image_type: pa.DataType, reason: str) -> pa.Table:
    row = {c: None for c in ASKED_COLUMNS}
    row.update(benchmark=bench.name, rotation=0, image=None, **{SHARD_COLUMN: task.uri, ROW_COLUMN: -1,
                                                                SHARD_FAILED: reason})
    return asked_table([row], image_type)


def asked_table(rows: list[dict], image_type: pa.DataType) -> pa.Table:
    """Asked rows as one Arrow table: the image (its own type: bytes or a path), the asked
    columns as strings (rotation an integer), the shard and the shard-failure marker."""
    fields = [pa.field("image", image_type)] + [pa.field(c, pa.int32() if c == "rotation" else pa.string())
                                                 for c in ASKED_COLUMNS]
    fields += [pa.field(SHARD_COLUMN, pa.string()), pa.field(ROW_COLUMN, pa.int64()), pa.field(SHARD_FAILED, pa.string())]
    return pa.Table.from_pylist([{SHARD_FAILED: None, **r} for r in rows], schema=pa.schema(fields))


def read_shard(task: ShardTask, bench: BenchmarkSpec, storage: Storage) -> Iterator[pa.Table]:
    """The questions of one shard, a batch at a time. A bad row is a question with an
    error and no image (so nothing is generated for it); a shard that fails to read ends
    with one marker row carrying the reason, and the driver drops that shard's rows."""
    loc = parse_uri(task.uri)
    image_type = pa.binary()
    try:
        with storage.filesystem(loc).open_input_file(loc.path) as handle:
            reader = pq.ParquetFile(handle)
            image_type = reader.schema_arrow.field(bench.image_column).type
            if pa.types.is_large_binary(image_type) or pa.types.is_binary_view(image_type):
                image_type = pa.binary()
            elif not pa.types.is_binary(image_type):
                image_type = pa.string()
            done = 0
            for batch in reader.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(task.columns)):
                rows = batch.to_pylist()[: task.rows - done]
                asked = []
                for k, row in enumerate(rows):
                    for question in ask(row, bench, f"{loc.uri}#{done + k}"):
                        image = row.get(bench.image_column) if question["problem"] is None else None
                        asked.append({**question, "image": image, SHARD_COLUMN: task.uri, ROW_COLUMN: done + k})
                done += len(rows)
                if asked:
                    yield asked_table(asked, image_type)
                if done >= task.rows:
                    break
    except Exception as exc:  # noqa: BLE001 - any read failure fails this shard, not the run
        yield _marker(task, bench, image_type, f"{type(exc).__name__}: {str(exc).strip()[:300]}")
