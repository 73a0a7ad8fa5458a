"""The stall watch: what a job says when it stops making progress (the parts without Ray;
the fine-tuning tracking test watches a real stalled run on Ray)."""

from __future__ import annotations

import time

from pipelines.stall import StallWatch


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_stall_is_described_once_per_period_and_its_end_is_announced():
    lines: list[str] = []
    stages = {"rank 0": "waiting for data for 9 s (3 done)"}
    watch = StallWatch("job", after_s=0.2, stages=lambda: stages,
                       demands=lambda: "Ray is waiting for: tasks/actors waiting for {CPU: 1} x2", emit=lines.append)
    with watch:
        assert wait_for(lambda: lines)
        first = lines[0]
        assert first.startswith("job: no progress for ")
        assert "rank 0: waiting for data for 9 s (3 done)" in first and "{CPU: 1} x2" in first
        count = len(lines)
        time.sleep(0.12)
        assert len(lines) <= count + 1, "at most one message per after_s"
        watch.progress()
        assert lines[-1] == "job: progressing again"
        quiet = len(lines)
        time.sleep(0.1)  # within after_s of the progress: nothing more
        assert len(lines) == quiet


def test_a_moving_counter_is_progress_and_a_failing_one_is_not_a_crash():
    lines: list[str] = []
    value = {"n": 0}

    def counter() -> int:
        value["n"] += 1  # moves at every check: never stalled
        return value["n"]

    with StallWatch("busy", after_s=0.2, counter=counter, demands=lambda: "", emit=lines.append):
        time.sleep(0.6)
    assert not [ln for ln in lines if "no progress" in ln]

    def broken() -> int:
        raise ConnectionError("board gone")

    with StallWatch("stuck", after_s=0.2, counter=broken, stages=lambda: {}, demands=lambda: "demands",
                    emit=lines.append):
        assert wait_for(lambda: any("stuck: no progress" in ln for ln in lines))
    assert "no stage has reported yet" in lines[-1]
