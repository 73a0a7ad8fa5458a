"""The caption job: plan → one Ray Data pipeline → per-shard assembly → commit → summary.

The pipeline (`build_job_dataset`) is `from_items(shards to do)` → the per-shard reader
(`read.read_shards`, `max_open_shards` tasks at once) → the TroL predictor actor pool (the
same stage as the processor's, `stages.predictor_stage_args`). Its own DataContext (a copy;
Ray's global one is left alone) preserves order, so the driver receives each shard's rows
together, one shard after another: it assembles one shard at a time and hands each complete
shard to a committer thread. Memory at the driver does not grow with the dataset.

What the driver does not take on trust: a shard is committed only with every one of its
rows; a shard whose reader sent a failure marker, or whose rows stopped before all came
back (a batch that failed every retry is dropped by Ray Data, `max_errored_blocks` -1),
fails with its reason while the other shards go on. A run that cannot go on (the model
cannot load; nothing moved for `stall_timeout_s`) aborts: committed shards stay.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..specs import CaptionSpec
from .assembly import ROW, AssemblyError, ShardAssembly
from .commit import Committer
from .lease import LeaseKeeper
from .plan import CaptionPlan, Shard, plan_caption
from .predictor import ACTOR, FATAL
from .read import SHARD, read_shards
from .stages import CaptionProcessorConfig, add_predictor, predictor_stage_args
from .summary import RunOutcome, summarize
from .watchdog import describe_abort

log = logging.getLogger(__name__)
_RESULT_COLUMNS = [ROW, "caption", "error", "num_tokens"]


def processor_config(spec: CaptionSpec) -> CaptionProcessorConfig:
    """The job's spec seen as the processor's config: the predictor is one and the same."""
    return CaptionProcessorConfig(
        model=spec.model, prompt=spec.prompt, generation=spec.generation, batch_size=spec.batch_size,
        concurrency=spec.concurrency, cpus_per_actor=spec.cpus_per_actor, gpus_per_actor=spec.gpus_per_actor,
        dtype=spec.dtype, quantize=spec.quantize, image_column=spec.image_column,
        max_image_pixels=spec.max_image_pixels, transient_retries=spec.transient_retries,
        model_cache_dir=spec.model_cache_dir, storage=spec.storage)


def build_job_dataset(plan: CaptionPlan, work: list[Shard]) -> Any:
    import ray

    spec = plan.spec
    items = [{"shard": i, "uri": s.uri, "rows": s.rows, "selected": s.wanted is not None,
              "wanted": [] if s.wanted is None else s.wanted.tolist()} for i, s in enumerate(work)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    context = ds.context  # this dataset's own copy of the DataContext
    context.execution_options.preserve_order = True
    context.max_errored_blocks = -1  # a lost batch fails its shard (the driver checks), not the run
    context.execution_no_progress_timeout_s = spec.stall_timeout_s
    ds = ds.map_batches(
        read_shards, batch_size=1, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=min(spec.max_open_shards, len(work))),
        fn_kwargs=dict(model=plan.model, storage=plan.storage, cache_dir=spec.model_cache_dir,
                       image_column=spec.image_column, batch_rows=spec.batch_size,
                       max_pixels=spec.max_image_pixels, retries=spec.transient_retries))
    return add_predictor(ds, predictor_stage_args(processor_config(spec), plan.model, plan.storage, for_job=True,
                                                  prompt_column=None))


class ShardCollector:
    """Takes the pipeline's output blocks, assembles each shard, commits complete ones,
    fails the ones that cannot complete. At most one shard is assembled at a time: the
    dataset preserves order, so once rows of shard k arrive, shards before k have sent all
    they will ever send."""

    def __init__(self, work: list[Shard], committer: Committer, outcome: RunOutcome):
        self.work, self.committer, self.outcome = work, committer, outcome
        self.closed = np.zeros(len(work), dtype=bool)
        self.frontier = 0  # every shard before this one is closed (committing, committed or failed)
        self.current: int | None = None
        self.assembly: ShardAssembly | None = None
        self.late_rows = 0

    def take(self, block: pa.Table) -> None:
        if block.num_rows == 0:
            return
        shards = block.column(SHARD).to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(shards)]
        for start, end in zip(cuts[:-1], cuts[1:]):
            self._take(int(shards[start]), block.slice(start, end - start))

    def _take(self, k: int, part: pa.Table) -> None:
        if not 0 <= k < len(self.work) or self.closed[k]:
            self.late_rows += part.num_rows  # a shard already failed: its output stays unwritten
            return
        for j in range(self.frontier, k):
            if not self.closed[j]:
                self._fail(j, self._incomplete(j))
        fatal = part.column(FATAL)
        if fatal.null_count < len(fatal):
            self._fail(k, next(v for v in fatal.to_pylist() if v is not None))
            return
        if self.current != k:
            self.current, self.assembly = k, ShardAssembly(self.work[k].rows, self.work[k].wanted)
        self._count(part)
        try:
            done = self.assembly.add(part.select(_RESULT_COLUMNS))
        except AssemblyError as exc:
            self._fail(k, f"rows do not fit the shard: {exc}")
            return
        if done:
            table = self.assembly.table()
            self._close(k)
            self.committer.submit(self.work[k], table)

    def _count(self, part: pa.Table) -> None:
        out = self.outcome
        if out.first_out is None:
            out.first_out = time.time()
        else:
            out.rows_after_first += part.num_rows
        for item in pc.value_counts(part.column(ACTOR)).to_pylist():
            out.per_actor[item["values"]] += item["counts"]

    def _incomplete(self, j: int) -> str:
        shard = self.work[j]
        expected = shard.rows if shard.wanted is None else len(shard.wanted)
        got = self.assembly.received if self.current == j and self.assembly is not None else 0
        return (f"incomplete: {got} of {expected} rows came back; the others were lost with a batch that failed "
                "every retry (the job's Ray Data log names the error)")

    def _close(self, k: int) -> None:
        self.closed[k] = True
        if self.current == k:
            self.current, self.assembly = None, None
        while self.frontier < len(self.work) and self.closed[self.frontier]:
            self.frontier += 1

    def _fail(self, k: int, why: str) -> None:
        log.error("shard %s failed: %s", self.work[k].uri, why)
        self.outcome.failed[self.work[k].uri] = why
        self._close(k)

    def finish(self) -> None:
        """The pipeline has ended: every shard not closed yet lost rows."""
        for j in range(self.frontier, len(self.work)):
            if not self.closed[j]:
                self._fail(j, self._incomplete(j))

    def stop(self, why: str) -> None:
        """The run stopped early: what is not closed was not finished."""
        for j in range(self.frontier, len(self.work)):
            if not self.closed[j]:
                self.outcome.failed[self.work[j].uri] = why
                self._close(j)


def _operator_figures(ds: Any) -> dict[str, Any]:
    """Ray Data's own per-operator wall and CPU seconds (best effort: its stats API moves)."""
    try:
        summary = ds._get_stats_summary()
        return {op.operator_name: {"wall_s": round(float(op.time_total_s), 3)}
                for op in summary.operators_stats if hasattr(op, "time_total_s")}
    except Exception:  # noqa: BLE001 - a report, not the job
        return {}


def _run_pipeline(plan: CaptionPlan, work: list[Shard], keeper: LeaseKeeper, committer: Committer,
                  outcome: RunOutcome) -> None:
    collector = ShardCollector(work, committer, outcome)
    ds = None
    try:
        ds = build_job_dataset(plan, work)
        keeper.renew()  # now with this run's Ray job, so a rerun can tell when it has ended
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
            collector.take(block)
        collector.finish()
    except BaseException as exc:  # noqa: BLE001 - recorded; the caller raises it after the summary
        outcome.aborted = describe_abort(exc, plan.spec)
        collector.stop("not finished: the run stopped")
    if collector.late_rows:
        log.warning("%d rows arrived for shards already failed; they were not written", collector.late_rows)
    if ds is not None:
        outcome.operators = _operator_figures(ds)


def execute_caption(plan: CaptionPlan) -> dict[str, Any]:
    """Run the shards still to do; write and return the job summary. If the run itself
    dies (say, the model cannot load), shards committed so far stay committed, the summary
    records the abort, and the error is raised again."""
    t_start = time.time()
    outcome = RunOutcome()
    with LeaseKeeper(plan.storage, plan.output, plan.run_id, plan.spec.lease_seconds) as keeper:
        committer = Committer(plan)
        try:
            for shard in (s for s in plan.todo if s.rows == 0):  # nothing to caption: commit at once
                committer.submit(shard, None)
            work = [s for s in plan.todo if s.rows > 0]
            if work:
                _run_pipeline(plan, work, keeper, committer, outcome)
        finally:
            committer.close()
        outcome.committed += committer.committed
        outcome.failed.update(committer.failed)
        summary = summarize(plan, outcome, t_start, time.time())
    if outcome.aborted is not None:
        raise outcome.aborted
    return summary


def run_caption(spec: CaptionSpec, *, force: bool = False) -> dict[str, Any]:
    """Plan (fails fast on a bad spec), then caption what is not done yet."""
    return execute_caption(plan_caption(spec, force=force))

