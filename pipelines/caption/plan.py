"""Planning a caption run: which shards exist, which are verifiably done, what to do.

Planning does every check that can fail for a bad spec (locations, credentials, columns,
model location, write access) before Ray starts or any model code is imported. One bad
shard does not stop the plan: a shard whose footer cannot be read or whose columns do not
fit the spec becomes a failed shard with its reason, and the others go on; only when no
shard can work does the spec fail.

A shard is done only when its output object exists and its stats record the same input
(size and ETag or mtime), the same row count, the same spec fingerprint and the same
model identity. Anything else is redone; changed inputs and outputs whose input is gone
are reported.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .lease import acquire_lease
from ..models import ModelRef, resolve_model_ref
from ..storage.shards import find_shards
from ..specs import CaptionSpec, SpecError, public_dump
from ..storage import FileIdentity, Location, Storage, StorageError, parse_uri

STATS_DIR = "_stats"
SUMMARY = "_SUMMARY.json"
RUN = "_RUN.json"
# Spec fields that change what a caption says; a rerun into the same output must match.
FINGERPRINT_FIELDS = ("model", "prompt", "generation", "image_column", "id_columns", "dtype", "quantize")
_IMAGE_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string, pa.types.is_large_string,
                pa.types.is_binary_view, pa.types.is_string_view)


@dataclass
class Shard:
    uri: str  # the input object
    rel: str  # name relative to the input base; the output object has the same name
    rows: int
    out: Location
    stats: Location
    schema: pa.Schema  # output schema: id columns with this shard's types + caption columns
    identity: FileIdentity
    wanted: np.ndarray | None = None  # retry_errors: only these rows are redone
    why: str = "new"  # new, changed (what), incomplete, retry_errors


@dataclass
class CaptionPlan:
    spec: CaptionSpec
    storage: Storage
    model: ModelRef
    output: Location
    shards: list[Shard]  # every shard that can be captioned
    todo: list[Shard]
    fingerprint: str
    unusable: dict[str, str] = field(default_factory=dict)  # input uri → why it cannot be captioned
    orphans: list[str] = field(default_factory=list)  # outputs whose input is gone
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)
    took_over: str | None = None  # how this run took the output's lease from a dead (or --force'd) run


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint(spec: CaptionSpec) -> str:
    data = {k: v for k, v in public_dump(spec).items() if k in FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def output_schema(spec: CaptionSpec, shard_schema: pa.Schema, uri: str) -> pa.Schema:
    """The output's columns for one shard; SpecError names the field a bad shard violates."""
    names = shard_schema.names
    for col, fld in [(spec.image_column, "image_column")] + [(c, "id_columns") for c in spec.id_columns]:
        if col not in names:
            raise SpecError(fld, f"column {col!r} is not in {uri}; its columns are {names}")
    itype = shard_schema.field(spec.image_column).type
    if not any(check(itype) for check in _IMAGE_TYPES):
        raise SpecError("image_column", f"column {spec.image_column!r} in {uri} has type {itype}; "
                        "expected encoded image bytes or path/URI strings")
    fields = [shard_schema.field(c) for c in spec.id_columns]
    fields += [pa.field("caption", pa.string()), pa.field("error", pa.string()),
               pa.field("num_tokens", pa.int32()), pa.field("model", pa.string())]
    return pa.schema(fields)


def stats_mismatch(stats: Any, shard: Shard, fingerprint_: str, model: ModelRef) -> str | None:
    """Why committed stats do not prove `shard` done with this spec and model (None: done)."""
    if not isinstance(stats, dict):
        return "its stats are unreadable"
    checks = [("input_size", shard.identity.size, "input size"), ("input_version", shard.identity.version,
              "input version (ETag/mtime)"), ("rows", shard.rows, "row count"),
              ("fingerprint", fingerprint_, "spec fingerprint"), ("model_identity", model.identity, "model")]
    changed = [label for key, want, label in checks if stats.get(key) != want]
    return f"changed since committed: {', '.join(changed)}" if changed else None


def plan_caption(spec: CaptionSpec, *, claim: bool = True, force: bool = False) -> CaptionPlan:
    """Every check a bad spec can fail, with the field named; no Ray, no model code.
    With `claim`, also take the output's lease (refused while another run holds it, unless
    `force`) and record this run there, which proves write access."""
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
    try:
        existing = {f.path for f in storage.list_files(output)} if storage.is_dir(output) else set()
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None
    try:
        model = resolve_model_ref(spec.model, storage)
    except StorageError as exc:
        raise SpecError("model", str(exc)) from None
    fp = fingerprint(spec)

    def inspect(loc: Location) -> Shard | tuple[str, SpecError | StorageError]:
        rel = posixpath.relpath(loc.path, base.path)
        try:
            identity = storage.stat(loc)
            meta = storage.parquet_metadata(loc)
            schema = output_schema(spec, meta.schema.to_arrow_schema(), loc.uri)
        except (StorageError, SpecError) as exc:
            return loc.uri, exc
        except Exception as exc:  # noqa: BLE001 - a footer pyarrow cannot parse is this shard's problem
            return loc.uri, StorageError(f"the Parquet footer cannot be read: {type(exc).__name__}: {exc}")
        shard = Shard(loc.uri, rel, meta.num_rows, output.join(rel), output.join(STATS_DIR, rel + ".json"),
                      schema, identity)
        _decide(shard, storage, existing, fp, model, spec.retry_errors)
        return shard

    with ThreadPoolExecutor(max_workers=16) as pool:  # footers and stats are tiny; latency dominates
        inspected = list(pool.map(inspect, found))
    shards = [s for s in inspected if isinstance(s, Shard)]
    problems = {uri: err for uri, err in (s for s in inspected if not isinstance(s, Shard))}
    if not shards:
        uri, err = next(iter(problems.items()))
        others = f" (and no other of the {len(problems)} shards can be captioned)" if len(problems) > 1 else ""
        if isinstance(err, SpecError):
            raise SpecError(err.field, err.message + others)
        raise SpecError("input", f"{err}{others}")
    unusable = {uri: (f"{err.field}: {err.message}" if isinstance(err, SpecError) else str(err))
                for uri, err in problems.items()}
    inputs = {posixpath.relpath(loc.path, base.path) for loc in found}
    stats_prefix = output.join(STATS_DIR).path + "/"
    orphans = sorted(output.join(p[len(stats_prefix):-len(".json")]).uri for p in existing
                     if p.startswith(stats_prefix) and p.endswith(".json")
                     and p[len(stats_prefix):-len(".json")] not in inputs)
    plan = CaptionPlan(spec, storage, model, output, shards, [s for s in shards if s.why != "done"], fp,
                       unusable, orphans)
    _check_run(plan, has_done=any(s.why != "new" for s in shards), claim=claim, force=force)
    return plan


def _decide(shard: Shard, storage: Storage, existing: set[str], fp: str, model: ModelRef, retry_errors: bool) -> None:
    """Set `shard.why` (done or the reason to redo it) and, for retry_errors, its rows."""
    if shard.stats.path not in existing:
        shard.why = "new"
        return
    if shard.out.path not in existing:
        shard.why = "incomplete: stats without output"
        return
    try:
        stats = storage.read_json(shard.stats)
    except (StorageError, ValueError):
        stats = None
    mismatch = stats_mismatch(stats, shard, fp, model)
    if mismatch:
        shard.why = mismatch
        return
    shard.why = "done"
    if retry_errors and int(stats.get("errors", 0)) > 0:
        try:
            with storage.filesystem(shard.out).open_input_file(shard.out.path) as f:
                errors = pq.read_table(f, columns=["error"]).column("error")
        except Exception:  # noqa: BLE001 - an unreadable output is redone whole
            shard.why = "incomplete: committed output unreadable"
            return
        rows = np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False))
        if rows.size and errors.length() == shard.rows:
            shard.wanted, shard.why = rows.astype(np.int64), "retry_errors"


def _check_run(plan: CaptionPlan, has_done: bool, claim: bool, force: bool) -> None:
    """Refuse to mix captions of different specs in one output; take the lease; prove
    write access early."""
    run = plan.output.join(RUN)
    try:
        if has_done and plan.storage.exists(run):
            before = plan.storage.read_json(run)
            if before.get("fingerprint") != plan.fingerprint:
                changed = [k for k in FINGERPRINT_FIELDS if before.get("spec", {}).get(k) != public_dump(plan.spec)[k]]
                raise SpecError("output", f"{plan.output.uri} holds captions made with a different "
                                f"{', '.join(changed) or 'spec'}; use a new output or remove the old one")
        if claim:
            plan.took_over = acquire_lease(plan.storage, plan.output, plan.run_id, plan.spec.lease_seconds,
                                           force=force)
            plan.storage.write_json(run, {"run_id": plan.run_id, "fingerprint": plan.fingerprint,
                                          "started_at": now_iso(), "spec": public_dump(plan.spec)})
    except StorageError as exc:
        raise SpecError("output", str(exc)) from None
