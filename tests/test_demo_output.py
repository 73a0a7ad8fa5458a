"""The first run reads like a product, and two local jobs started together both finish.

A reduced `python -m jobs.demo` (the same stages, 4 steps, 4 held-out digits) and a caption
job start at the same moment, each as its own process with no Ray address: each starts a
private Ray (before, the second joined the first's and both starved). The demo's output
carries no line from Ray's internal actors, each step line once, its stages with times, the
caption table, the accuracy and where the outputs are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

RAY_PROCESS = re.compile(r"\((?:(\w+) )?pid=\d+(?:, ip=[\d.]+)?\)")


def overload_warning(line: str, _state: dict = {"in": False}) -> bool:  # noqa: B006 - scan state
    """Ray Train's controller warns, with a traceback, when its 5 s request to the autoscaling
    coordinator times out on an overloaded CPU ("safe to ignore" if transient). A real warning,
    kept visible on purpose; on a shared 2-core test machine it comes and goes, so the scan
    skips it and its traceback."""
    if "(TrainController" not in line:
        _state["in"] = False
        return False
    if "Failed to send resource request" in line:
        _state["in"] = True
    return _state["in"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def test_demo_output_is_clean_while_another_local_job_runs(tmp_path: Path, tiny_model: Path, write_shards):
    write_shards(str(tmp_path / "shards"), [6])
    started = time.perf_counter()
    demo_log, caption_log = tmp_path / "demo.log", tmp_path / "caption.log"
    demo = start(["jobs.demo", "--output", str(tmp_path / "demo"), "--max-steps", "4", "--digits", "4",
                   "--questions", "6"], demo_log)
    caption = start(["jobs.caption", str(REPO / "jobs" / "examples" / "caption_local.yaml"),
                     "--set", f"input={tmp_path / 'shards'}", "--set", f"output={tmp_path / 'captions'}",
                     "--set", f"model={tiny_model}", "--set", "generation.max_new_tokens=4"], caption_log)
    try:
        caption_status = caption.wait(timeout=600)
        demo_status = demo.wait(timeout=max(60, 900 - (time.perf_counter() - started)))
    finally:
        for process in (demo, caption):
            if process.poll() is None:
                process.kill()
    out, other = demo_log.read_text(), caption_log.read_text()
    print(f"demo: {len(out.splitlines())} lines, both jobs done in {time.perf_counter() - started:.0f} s")
    assert caption_status == 0, other[-3000:]
    assert demo_status == 0, out[-3000:]
    assert "running on a private local Ray" in other and "caption: done" in other

    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    lines = [line for line in plain.splitlines() if not overload_warning(line)]
    # Nothing from Ray's own actors (Train controller, placement-group cleaner, Ray Data
    # coordinators, ...): the only Ray processes that speak are the workers running our loop.
    speakers = {m.group(1) for line in lines if (m := RAY_PROCESS.match(line))}
    assert speakers <= {"RayTrainWorker"}, sorted(filter(None, speakers))
    assert not [line for line in lines if "Traceback" in line or "TrainingReport" in line]
    for step in range(1, 5):
        assert sum(1 for line in lines if re.search(rf"\bstep {step}/4 loss ", line)) == 1, f"step {step}"
    for i in range(1, 6):
        assert re.search(rf"^\[{i}/5\] done in \d+\.\d s$", plain, re.M), f"stage {i} has no time"
    assert "finetune: running on a private local Ray" in plain
    table = plain[plain.index("  image "):]
    for name in ("astronaut", "camera", "digit-000"):
        assert re.search(rf"^  {name}\s+\S", table, re.M), name
    assert re.search(r"held-out digits captioned correctly: \d/4 \(\d+%\)", plain)
    # the evaluation stage: both models side by side, each accuracy recounted from its predictions
    assert re.search(r"recounted from predictions\.parquet: untrained \d/6, fine-tuned \d/6", plain)
    assert "fine-tuned" in plain[plain.index("[5/5]"):] and "untrained" in plain[plain.index("[5/5]"):]
    outputs = plain[plain.index("outputs:"):].splitlines()[1:]
    assert {line.split()[0] for line in outputs} >= {"fine-tuned", "captions", "untrained"}
    assert all(Path(line.split()[-1]).exists() for line in outputs)
