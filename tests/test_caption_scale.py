"""Scale: hundreds of shards and tens of thousands of rows through the caption job on 2 CPUs,
with the driver (its own process, joined to the session's Ray) measured at 1x and at 2x.

The 2x run has twice the shards *and* twice the rows (the same rows per shard): what it
checks is that nothing in the driver grows with either. Captioning the rows is most of this
test's time (~1,000-1,300 rows/s here, the tiny model's forward pass in the predictor), so
the shards hold 50 rows each: 15,000 then 30,000 rows, 49 s here (100 rows each: 72 s, with
the same driver peaks, 236 and 244 MiB, against 235 and 242)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caption_helpers import start_driver, wait_for_exit, write_many_shards, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

SHARDS, ROWS = 300, 50  # 15,000 rows at 1x, 30,000 at 2x  # 30,000 rows at 1x, 60,000 at 2x


def run_job(tiny_model: Path, tmp_path: Path, name: str, shards: int, rows_each: int) -> tuple[dict, float, float]:
    rows = write_many_shards(tmp_path / name / "in", shards, rows_each)
    spec = write_spec(tmp_path / name / "spec.yaml", {
        "input": str(tmp_path / name / "in"), "output": str(tmp_path / name / "out"), "model": str(tiny_model),
        "id_columns": ["id"], "dtype": "float32", "batch_size": 512, "generation": {"max_new_tokens": 1},
        "max_open_shards": 4})
    started = time.monotonic()
    proc = start_driver(spec, log=tmp_path / name / "driver.log")
    status = wait_for_exit(proc, timeout=900)
    seconds = time.monotonic() - started
    assert status == 0, (tmp_path / name / "driver.log").read_text()[-3000:]
    summary = json.loads((tmp_path / name / "out" / "_SUMMARY.json").read_text())
    assert (summary["rows_out"], summary["shards_committed"], summary["errors"]) == (rows, shards, 0)
    # The driver's own peak (VmHWM), measured by the driver process itself at the end.
    return summary, seconds, summary["driver_peak_rss_mib"]


def test_hundreds_of_shards_bounded_driver_memory(tiny_model: Path, tmp_path: Path) -> None:
    one, secs_one, rss_one = run_job(tiny_model, tmp_path, "x1", SHARDS, ROWS)
    two, secs_two, rss_two = run_job(tiny_model, tmp_path, "x2", 2 * SHARDS, ROWS)
    for label, summary, secs, rss in (("1x", one, secs_one, rss_one), ("2x", two, secs_two, rss_two)):
        print(f"\nscale {label}: {summary['shards_committed']} shards, {summary['rows_out']} rows in {secs:.1f} s "
              f"wall ({summary['images_per_s']} images/s over the pipeline, steady "
              f"{summary['steady_images_per_s']}), driver peak RSS {rss:.0f} MiB")
    # Twice the shards and rows, the same open-shard cap: the driver's peak must not grow
    # with either (a few MiB of plan metadata and allocator noise aside).
    assert rss_two <= rss_one * 1.10 + 16, (rss_one, rss_two)
    # Ray's driver libraries and pyarrow are most of it; the shards' captions are a few MiB.
    assert rss_one < 512, rss_one
    out = pq.read_table(tmp_path / "x2" / "out" / f"part-{2 * SHARDS - 1:05d}.parquet")
    assert out.num_rows == ROWS and out.column("id").to_pylist()[:2] == [f"{2 * SHARDS - 1}-0", f"{2 * SHARDS - 1}-1"]
