"""What the caption scheduler (caption_run) keeps track of: the shards open now, each
batch call in flight, and the run's outcome for the summary."""

from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .assembly import ShardAssembly
from .caption_plan import Shard


class RunAborted(RuntimeError):
    """The run cannot go on at all (the model cannot load)."""


@dataclass
class OpenShard:
    shard: Shard
    assembly: ShardAssembly
    attempt: int = 0
    reader: Any = None
    expect_table: bool = False
    reader_done: bool = False
    backlog: deque = field(default_factory=deque)  # batch refs waiting for an actor
    in_flight: int = 0
    restart_at: float | None = None
    commit: Future | None = None


@dataclass
class Call:
    rel: str
    attempt: int
    batch: Any
    tries: int
    actor: int


@dataclass
class RunOutcome:
    committed: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    per_actor: Counter = field(default_factory=Counter)
    first_out: float | None = None
    rows_after_first: int = 0
    aborted: BaseException | None = None
