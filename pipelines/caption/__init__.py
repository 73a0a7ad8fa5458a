"""Batch captioning with TroL on Ray Data.

Two ways in:

- the **processor** (`build_caption_processor(CaptionProcessorConfig(...))`): a
  `Dataset -> Dataset` of Ray Data stages (decode + preprocess on CPU, then the TroL
  predictor actor pool) for any Ray Data pipeline, any source and sink;
- the **job** (`run_caption(spec)`, `python -m jobs.caption SPEC.yaml`): Parquet shards in,
  one output object per shard, with verified resume, a lease, failed shards reported with
  their reasons and bounded driver memory, built on the same stages.

Modules: `plan` (which shards, which are done; no Ray), `read` (the per-shard reader
stage), `preprocess` (image cells → pixels), `stages` (the processor and the predictor
stage's arguments), `predictor` (the actor), `assembly` + `commit` (a shard's rows → one
object), `lease` (one run per output), `job` (the pipeline and the driver loop),
`watchdog` (why a run stopped), `summary` (`_SUMMARY.json`, exit statuses).
Nothing here imports Ray, torch or trol at import time: a driver checks a spec without them.
"""

from .commit import commit_shard
from .job import build_job_dataset, execute_caption, processor_config, run_caption
from .lease import OutputLockedError
from .plan import RUN, STATS_DIR, SUMMARY, CaptionPlan, Shard, plan_caption
from .stages import CaptionProcessorConfig, build_caption_processor
from .summary import (EXIT_ABORTED, EXIT_BAD_SPEC, EXIT_COMPLETE, EXIT_LOCKED, EXIT_PARTIAL, exit_status,
                      format_summary)
from .watchdog import RunAborted

__all__ = [
    "EXIT_ABORTED", "EXIT_BAD_SPEC", "EXIT_COMPLETE", "EXIT_LOCKED", "EXIT_PARTIAL", "RUN", "STATS_DIR", "SUMMARY",
    "CaptionPlan", "CaptionProcessorConfig", "OutputLockedError", "RunAborted", "Shard", "build_caption_processor",
    "build_job_dataset", "commit_shard", "execute_caption", "exit_status", "format_summary", "plan_caption",
    "processor_config", "run_caption",
]
