"""Why a caption run stopped, in words a user can act on.

The no-progress watchdog is Ray Data's own (`execution_no_progress_timeout_s` on the job's
dataset, set from the spec's `stall_timeout_s`): when no block moves through any stage for
that long, execution fails. A run can hang without it: an actor that waits for GPUs the
cluster never offers, an actor that ended dead for good and is never replaced (Ray issue
#62746). What it was waiting for comes from Ray: which stages still had work, and the
cluster's pending resource demands.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..stall import pending_demands

if TYPE_CHECKING:
    from ..evaluate.spec import EvaluateSpec
    from ..specs import CaptionSpec


class RunAborted(RuntimeError):
    """The run cannot go on at all (the model cannot load, nothing moves)."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:500]


def describe_abort(exc: BaseException, spec: CaptionSpec | EvaluateSpec) -> BaseException:
    """The exception a run that could not go on ends with (KeyboardInterrupt and the like
    are kept as they are)."""
    if isinstance(exc, RunAborted) or not isinstance(exc, Exception):
        return exc
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = "\n".join(str(e) for e in chain)
    if "ExecutionTimeoutError" in names:
        stages = [ln.strip().lstrip("- ") for ln in text.splitlines() if re.match(r"\s+- .+active task", ln)]
        low, high = (spec.concurrency, spec.concurrency) if isinstance(spec.concurrency, int) else spec.concurrency
        ask = {"CPU": spec.cpus_per_actor, **({"GPU": spec.gpus_per_actor} if spec.gpus_per_actor else {})}
        return RunAborted(
            f"nothing moved through the pipeline for {spec.stall_timeout_s:.0f} s (stall_timeout_s); stages still "
            f"waiting: {'; '.join(stages) or 'unknown'}; the predictor pool asks for {low}"
            f"{f' to {high}' if high != low else ''} × {ask}; {pending_demands()}. Give the cluster what the "
            "predictor asks for (concurrency, cpus_per_actor, gpus_per_actor), or raise stall_timeout_s if the "
            "model's first load takes longer")
    if any(marker in text for marker in ("__init__", "creation task", "ActorDiedError")) and (
            "CaptionPredictor" in text or "MapWorker" in text):
        return RunAborted(f"the predictor could not start (model {spec.model}): {_last_line(str(chain[-1]))}")
    return RunAborted(f"{type(chain[-1]).__name__}: {_last_line(str(chain[-1]))}")

