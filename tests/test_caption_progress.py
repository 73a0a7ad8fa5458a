"""The caption job's progress lines count committed shards (their stats markers) and rows/s."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from jobs.caption_progress import CaptionProgress
from pipelines.caption import STATS_DIR
from pipelines.storage import Storage, parse_uri


def plan_with_shards(output: Path, rows: list[int], already_done: int = 0) -> SimpleNamespace:
    out = parse_uri(str(output))
    shards = [SimpleNamespace(rows=n, stats=out.join(STATS_DIR, f"part-{i}.parquet.json")) for i, n in enumerate(rows)]
    return SimpleNamespace(storage=Storage(), output=out, shards=shards, todo=shards[already_done:])


def commit(plan: SimpleNamespace, index: int) -> None:
    path = Path(plan.shards[index].stats.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def test_lines_count_committed_shards_and_rows(tmp_path):
    plan = plan_with_shards(tmp_path / "out", [10, 20, 30], already_done=1)
    lines: list[str] = []
    progress = CaptionProgress(plan, interval_s=60, emit=lines.append)
    progress.report()
    commit(plan, 0)  # done by an earlier run: counted in shards, not in this run's rows
    commit(plan, 2)
    progress.report()
    assert lines[0].startswith("caption progress: 1/3 shards done, 0/50 rows this run, 0.0 rows/s")
    assert lines[1].startswith("caption progress: 2/3 shards done, 30/50 rows this run, ")
    assert float(lines[1].split(", ")[2].split()[0]) > 0


def test_reports_at_start_periodically_and_at_exit(tmp_path):
    plan = plan_with_shards(tmp_path / "out", [5, 5])
    lines: list[str] = []
    with CaptionProgress(plan, interval_s=0.05, emit=lines.append):
        time.sleep(0.4)
        commit(plan, 0)
        commit(plan, 1)
    assert len(lines) >= 4
    assert "0/2 shards done" in lines[0] and "2/2 shards done, 10/10 rows" in lines[-1]


def test_a_failing_listing_is_reported_not_raised(tmp_path):
    plan = plan_with_shards(tmp_path / "out", [5])
    plan.storage = Storage(endpoint_url="http://127.0.0.1:9")  # nothing listens on the discard port
    plan.output = parse_uri("s3://nowhere/out")
    lines: list[str] = []
    CaptionProgress(plan, interval_s=60, emit=lines.append).report()
    assert lines and "listing the output failed" in lines[0]
