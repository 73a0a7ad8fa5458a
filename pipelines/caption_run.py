"""The caption run's scheduler on Ray core: readers → predictor actors → shard commits.

Why not one Ray Data pipeline: its read stage has no cap on how many shards are open at
once, blocks of many shards mix, and the driver had to buffer rows of every open shard.
Here the driver decides everything that costs memory:

- at most `max_open_shards` shards are open (read, captioned or being committed) at once;
  each open shard has one streaming reader task that runs at most a few batches ahead;
- pixels go from a reader's batch straight to an actor (object refs; the driver never
  fetches them); only caption results come back to the driver, into a ShardAssembly;
- a complete shard is committed (one PUT, then its stats) by a writer thread, and only
  then does its slot open for the next shard.

Faults: a batch whose actor died (killed, or it ended itself on a broken device) is sent
again — Ray restarts the actor; a batch that failed for a reason of the infrastructure
(out of memory) is retried with backoff; after `transient_retries` the shard fails, not
its rows. A reader that hit a transient store error is restarted with backoff (the
shard's partial results are dropped); a bad shard fails at once. A model that cannot load
aborts the run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .assembly import AssemblyError, ShardAssembly
from .caption_plan import CaptionPlan, Shard
from .caption_state import Call, OpenShard, RunAborted, RunOutcome
from .caption_read import read_shard_stream
from .images import describe_exception

log = logging.getLogger(__name__)
_ACTOR_QUEUE = 2  # batches per actor: one running, one waiting, so the device never idles
_READ_AHEAD = 2  # batches per open shard read but not yet handed to an actor
_RESOURCE_WAIT_S = 600  # how long the predictor actors may wait for the cluster's resources


class CaptionRunner:
    def __init__(self, plan: CaptionPlan, commit: Callable[[CaptionPlan, Shard, Any], dict[str, Any]]):
        self.plan, self.spec, self.commit_fn = plan, plan.spec, commit
        self.outcome = RunOutcome()
        self.open: dict[str, OpenShard] = {}
        self.calls: dict[Any, Call] = {}
        self.retry: list[tuple[float, Call]] = []
        self.group: Any = None
        self.actors: list[Any] = []
        self.actor_load: list[int] = []
        # An actor that died is being restarted by Ray: calls to it fail at once until it is
        # back, so it gets no batches; a cheap ping tells when it is ready again.
        self.actor_ready: list[bool] = []
        self.pings: dict[Any, int] = {}
        self.ping_due: dict[int, float] = {}

    # --- set-up ----------------------------------------------------------------------------

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .predictor import CaptionPredictor

        spec = self.spec
        spare = ray.cluster_resources().get("CPU", 0) - spec.actors * spec.cpus_per_actor
        if spare < 1:
            raise RunAborted(f"{spec.actors} actors × {spec.cpus_per_actor} CPU leave no whole CPU for reading "
                             "shards on this cluster; lower actors or cpus_per_actor")
        # The actors' resources are reserved in a placement group: reader tasks queued for a
        # CPU can never take the place of an actor that Ray is restarting (a deadlock:
        # readers wait for the actor to take their batches, the actor waits for a CPU).
        bundle = {"CPU": spec.cpus_per_actor, **({"GPU": spec.gpus_per_actor} if spec.gpus_per_actor else {})}
        self.group = placement_group([bundle] * spec.actors, strategy="SPREAD")
        ready, _ = ray.wait([self.group.ready()], timeout=_RESOURCE_WAIT_S)
        if not ready:
            raise RunAborted(f"the cluster did not offer {spec.actors} × {bundle} for the predictor actors within "
                             f"{_RESOURCE_WAIT_S} s; lower actors, gpus_per_actor or cpus_per_actor")
        actor_cls = ray.remote(CaptionPredictor)
        for i in range(spec.actors):
            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
            self.actors.append(actor_cls.options(
                num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor, scheduling_strategy=strategy,
                max_restarts=-1, max_task_retries=0).remote(
                model=self.plan.model, model_id=spec.model, storage=self.plan.storage, cache_dir=spec.model_cache_dir,
                dtype=spec.dtype, quantize=spec.quantize, device="cpu" if spec.gpus_per_actor == 0 else None,
                prompt=spec.prompt,
                generation=spec.generation.model_dump()))
            self.actor_load.append(0)
            self.actor_ready.append(True)
        self.reader = ray.remote(read_shard_stream).options(
            num_cpus=1, num_returns="streaming", max_retries=0,
            _generator_backpressure_num_objects=2 * (_READ_AHEAD + 1))

    def _open(self, shard: Shard) -> None:
        self.open[shard.rel] = OpenShard(shard, ShardAssembly(shard.rows, shard.wanted))
        self._start_reader(self.open[shard.rel])

    def _start_reader(self, st: OpenShard) -> None:
        spec, s = self.spec, st.shard
        st.assembly = ShardAssembly(s.rows, s.wanted)
        st.reader_done, st.expect_table, st.restart_at = False, False, None
        st.backlog.clear()
        st.reader = self.reader.remote(
            s.uri, model=self.plan.model, cache_dir=spec.model_cache_dir, storage=self.plan.storage,
            image_column=spec.image_column, id_columns=spec.id_columns, num_rows=s.rows, batch_rows=spec.batch_size,
            max_pixels=spec.max_image_pixels, retries=spec.transient_retries, wanted=s.wanted)

    # --- the loop --------------------------------------------------------------------------

    def run(self, todo: list[Shard]) -> RunOutcome:
        import ray

        queue = deque(todo)
        writers = ThreadPoolExecutor(max_workers=min(4, self.spec.max_open_shards))
        self.writers = writers
        try:
            self._start()
            while queue or self.open:
                while queue and len(self.open) < self.spec.max_open_shards:
                    self._open(queue.popleft())
                self._maintain()
                self._dispatch()
                self._ping_due_actors()
                waitables = ([st.reader for st in self.open.values() if self._wants_more(st)] + list(self.calls)
                             + list(self.pings))
                if waitables:
                    ready, _ = ray.wait(waitables, num_returns=1, timeout=0.2, fetch_local=False)
                    if ready:
                        ready, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0, fetch_local=False)
                    for item in ready:
                        if item in self.calls:
                            self._on_result(item)
                        elif item in self.pings:
                            self._on_ping(item)
                        else:
                            self._on_reader(item)
                else:
                    time.sleep(0.05)
        except BaseException as exc:
            self.outcome.aborted = exc
        finally:
            writers.shutdown(wait=True)
            for st in list(self.open.values()):
                self._collect_commit(st)
            for st in self.open.values():
                self.outcome.failed.setdefault(st.shard.uri, "not finished: the run stopped")
            self._stop()
        return self.outcome

    def _wants_more(self, st: OpenShard) -> bool:
        return (st.reader is not None and not st.reader_done and st.restart_at is None and st.commit is None
                and len(st.backlog) < _READ_AHEAD)

    def _maintain(self) -> None:
        now = time.time()
        for rel, st in list(self.open.items()):
            if st.restart_at is not None and st.restart_at <= now:
                log.info("restarting the read of %s (attempt %d)", st.shard.uri, st.attempt + 1)
                self._start_reader(st)
            if st.commit is not None and st.commit.done():
                self._collect_commit(st)
                self.open.pop(rel)

    def _collect_commit(self, st: OpenShard) -> None:
        if st.commit is None or not st.commit.done():
            return
        try:
            self.outcome.committed.append(st.commit.result())
        except Exception as exc:  # noqa: BLE001 - the shard fails; a rerun redoes it
            self.outcome.failed[st.shard.uri] = f"commit failed: {describe_exception(exc)}"
        st.commit = None

    def _dispatch(self) -> None:
        now = time.time()
        due = [c for t, c in self.retry if t <= now]
        self.retry = [(t, c) for t, c in self.retry if t > now]
        pending = deque(due)
        for rel, st in self.open.items():  # oldest shard first: finish shards, free their slots
            while st.backlog:
                pending.append(Call(rel, st.attempt, st.backlog.popleft(), 0, -1))
        ready = [i for i in range(len(self.actors)) if self.actor_ready[i]]
        while pending and ready:
            slot = min(ready, key=lambda i: self.actor_load[i])
            if self.actor_load[slot] >= _ACTOR_QUEUE:
                break
            call = pending.popleft()
            st = self.open.get(call.rel)
            if st is None or st.attempt != call.attempt:
                continue  # the shard failed or restarted meanwhile
            call.actor = slot
            self.calls[self.actors[slot].__call__.remote(call.batch)] = call
            self.actor_load[slot] += 1
            st.in_flight += 1
        for call in pending:  # put back what found no free actor
            if call.tries:
                self.retry.append((now, call))
            elif call.rel in self.open and self.open[call.rel].attempt == call.attempt:
                self.open[call.rel].backlog.append(call.batch)

    # --- events ----------------------------------------------------------------------------

    def _on_reader(self, reader: Any) -> None:
        import ray

        st = next((s for s in self.open.values() if s.reader is reader), None)
        if st is None:
            return
        try:
            ref = next(reader)
        except StopIteration:  # ended without its closing header: its worker died
            self._retry_shard(st, "the reader ended early")
            return
        except Exception as exc:  # noqa: BLE001 - the reader task itself failed (worker crash)
            self._retry_shard(st, f"the reader died: {describe_exception(exc)}")
            return
        if st.expect_table:
            st.expect_table = False
            st.backlog.append(ref)
            return
        try:
            header = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the reader's worker died: try the shard again
            self._retry_shard(st, f"the reader died: {describe_exception(exc)}")
            return
        if "rows" in header:
            st.expect_table = True
        elif header.get("end") == "done":
            st.reader_done = True
            self._maybe_commit(st)
        elif header.get("transient"):
            self._retry_shard(st, header["reason"])
        else:
            self._fail_shard(st, header.get("reason", "reading failed"))

    def _on_result(self, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        call = self.calls.pop(ref)
        self.actor_load[call.actor] -= 1
        st = self.open.get(call.rel)
        if st is not None and st.attempt == call.attempt:
            st.in_flight -= 1
        try:
            table, actor = ray.get(ref)
        except RayActorError as exc:
            if isinstance(exc, ActorDiedError) and "creation task" in str(exc):
                raise RunAborted(f"the predictor could not start (model {self.spec.model}): "
                                 f"{_last_line(str(exc))}") from None
            self._actor_lost(call.actor)
            self._retry_call(call, f"predictor actor died: {type(exc).__name__}", delay=0.0)
            return
        except Exception as exc:  # noqa: BLE001 - InfrastructureError or an unexpected failure
            self._retry_call(call, _last_line(str(exc)), delay=None)
            return
        if st is None or st.attempt != call.attempt:
            return  # a result of a shard that failed or restarted meanwhile
        now = time.time()
        if self.outcome.first_out is None:
            self.outcome.first_out = now
        else:
            self.outcome.rows_after_first += table.num_rows
        self.outcome.per_actor[actor] += table.num_rows
        try:
            st.assembly.add(table)
        except AssemblyError as exc:
            self._fail_shard(st, f"rows do not fit the shard: {exc}")
            return
        self._maybe_commit(st)

    def _actor_lost(self, slot: int) -> None:
        if self.actor_ready[slot]:
            log.warning("predictor actor %d died; Ray restarts it, its batches go out again", slot)
            self.actor_ready[slot] = False
            self.ping_due[slot] = time.time()

    def _ping_due_actors(self) -> None:
        now = time.time()
        for slot, due in list(self.ping_due.items()):
            if due <= now:
                del self.ping_due[slot]
                self.pings[self.actors[slot].model_id.remote()] = slot

    def _on_ping(self, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorDiedError

        slot = self.pings.pop(ref)
        try:
            ray.get(ref)
        except ActorDiedError as exc:
            if "creation task" in str(exc):
                raise RunAborted(f"the predictor could not restart (model {self.spec.model}): "
                                 f"{_last_line(str(exc))}") from None
            self.ping_due[slot] = time.time() + 1.0
            return
        except Exception:  # noqa: BLE001 - still restarting: ask again shortly
            self.ping_due[slot] = time.time() + 1.0
            return
        log.info("predictor actor %d is back", slot)
        self.actor_ready[slot] = True

    def _retry_call(self, call: Call, why: str, delay: float | None) -> None:
        st = self.open.get(call.rel)
        if st is None or st.attempt != call.attempt:
            return
        call.tries += 1
        if call.tries > self.spec.transient_retries:
            self._fail_shard(st, f"a batch failed {call.tries} times; last: {why}")
            return
        wait = delay if delay is not None else min(16.0, 2.0 ** (call.tries - 1))
        log.warning("%s: batch retry %d of %d in %.1f s (%s)", st.shard.uri, call.tries,
                    self.spec.transient_retries, wait, why)
        self.retry.append((time.time() + wait, call))

    def _retry_shard(self, st: OpenShard, why: str) -> None:
        st.attempt += 1
        self._cancel_reader(st)
        if st.attempt > self.spec.transient_retries:
            self._fail_shard(st, f"{why} (after {self.spec.transient_retries} retries)")
            return
        wait = min(16.0, 2.0 ** (st.attempt - 1))
        log.warning("%s: %s; reading it again in %.1f s", st.shard.uri, why, wait)
        st.restart_at = time.time() + wait

    def _fail_shard(self, st: OpenShard, why: str) -> None:
        log.error("shard %s failed: %s", st.shard.uri, why)
        self.outcome.failed[st.shard.uri] = why
        self._cancel_reader(st)
        self.open.pop(st.shard.rel, None)

    def _cancel_reader(self, st: OpenShard) -> None:
        import ray

        if st.reader is not None and not st.reader_done:
            try:
                ray.cancel(st.reader, force=True)
            except Exception:  # noqa: BLE001 - it may have ended already
                pass
        st.reader = None
        st.backlog.clear()

    def _maybe_commit(self, st: OpenShard) -> None:
        if st.reader_done and st.assembly.complete and st.commit is None and st.shard.rel in self.open:
            table = st.assembly.table()
            st.assembly.parts = []  # the writer holds the only copy now
            st.commit = self.writers.submit(self.commit_fn, self.plan, st.shard, table)

    def _stop(self) -> None:
        import ray

        for st in self.open.values():
            self._cancel_reader(st)
        for actor in self.actors:  # free their CPUs/GPUs for whatever runs next on this cluster
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:500]
