"""What the finetune job costs over a bare torch loop: tokens/s as the job's summary reports
it, steady and end to end, against the same training done in this process without Ray.

The job runs through its public entrypoint (`jobs.finetune.main`) with one worker holding one
CPU (so Ray gives it one torch thread; the bare loop uses one too), on a private local Ray;
both train the same model on the same digits shards (`jobs.prepare digits`), stage full,
AdamW, warm-up + cosine schedule, clipping, for the same number of steps.

    python -m bench.train_step [--size tiny|small] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .caption_pipeline import start_local_ray
from .common import median, note, parse_args, print_machine, ratio, result
from .models import SHAPES, save_model
from .train_loop import PROMPT, TrainSettings, train

# (steps, batch size, digit image side, repeats)
WORKLOAD = {"tiny": (30, 16, 32, 1), "small": (8, 4, 112, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="torch threads of the bare loop: a Ray Train worker with 1 CPU gets one")
    parser.add_argument("--workdir", default=None)


def prepare_digits(folder: Path, image_size: int) -> None:
    from jobs.prepare import main as prepare_main

    with contextlib.redirect_stdout(io.StringIO()):
        status = prepare_main(["digits", "--output", str(folder), "--image-size", str(image_size), "--overwrite"])
    if status != 0:
        raise RuntimeError(f"jobs.prepare digits exited {status}")


def run_job(model: Path, data: Path, runs: Path, name: str, settings: TrainSettings) -> dict:
    import ray

    from jobs.finetune import main as finetune_main

    spec = {"data": str(data), "output": str(runs), "name": name, "base_model": str(model), "stage": "full",
            # 1 CPU steps; the machine's other CPU prepares data (2 tasks at 0.5, reserved with the worker)
            "workers": 1, "cpus_per_worker": 1, "data_tasks_per_worker": 2,
            "batch_size": settings.batch_size, "lr": settings.lr,
            "warmup_steps": settings.warmup_steps, "max_steps": settings.steps, "max_grad_norm": settings.max_grad_norm,
            "checkpoint_every": settings.steps, "seed": settings.seed, "prompt": PROMPT, "dtype": "float32"}
    spec_path = runs.parent / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    ray_seconds = start_local_ray()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            status = finetune_main([str(spec_path)])
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    if status != 0:
        raise RuntimeError(f"finetune job exited {status}")
    summary = json.loads((runs / name / "training_summary.json").read_text())
    return {"seconds": seconds, "ray_init_s": ray_seconds, "summary": summary}


def run_bare(model: Path, data: Path, out: Path, settings: TrainSettings) -> dict:
    started = time.perf_counter()
    run = train(model, data, settings)
    run.model.save_pretrained(out)  # the job exports its model too
    seconds = time.perf_counter() - started
    steady = run.step_s[len(run.step_s) // 5:]  # skip the first fifth: allocator and cache warm-up
    return {"seconds": seconds, "tokens": run.tokens, "loop_s": run.loop_s, "load_s": run.load_s,
            "data_wait_fraction": run.data_wait_s / run.loop_s, "steady_step_s": median(steady),
            "tokens_per_step": run.tokens / len(run.step_s)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], add_arguments, argv)
    steps, batch, image_size, repeats = WORKLOAD[args.size]
    settings = TrainSettings(steps=args.steps or steps, batch_size=args.batch_size or batch, warmup_steps=5)
    repeats = args.repeats or repeats
    torch.set_num_threads(args.worker_threads)
    print_machine("cpu", "float32", size=args.size, steps=settings.steps, batch=settings.batch_size)
    note(f"{SHAPES[args.size]}; digits at {image_size} px; job vs bare {repeats}x each, alternating")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(args.workdir or tmp)
        model = save_model(args.size, work / "model")
        data = work / "digits"
        prepare_digits(data, image_size)
        job_runs, bare_runs = [], []
        for r in range(repeats):
            order = ("job", "bare") if r % 2 == 0 else ("bare", "job")
            for name in order:
                if name == "job":
                    job_runs.append(run_job(model, data / "train", work / "runs", f"run{r}", settings))
                else:
                    bare_runs.append(run_bare(model, data / "train", work / f"bare{r}", settings))
        for run in job_runs:
            if run["summary"]["steps"] != settings.steps:
                raise RuntimeError(f"the job ran {run['summary']['steps']} steps, not {settings.steps}")
        reported = median([r["summary"]["mean_tokens_per_s"] for r in job_runs])
        bare_loop = median([r["tokens"] / r["loop_s"] for r in bare_runs])
        result("job_tokens_per_s_as_reported", reported, "tokens/s")
        result("bare_tokens_per_s_loop", bare_loop, "tokens/s")
        result("job_reported_over_bare", ratio(reported, bare_loop), "x")
        # Steady state: the job's logged intervals after its first (which holds Ray Data's
        # start), against the bare loop's median step after warm-up.
        job_steady = median([median([h["tokens_per_s"] for h in r["summary"]["history"][1:]] or [float("nan")])
                             for r in job_runs])
        bare_steady = median([r["tokens_per_step"] / r["steady_step_s"] for r in bare_runs])
        result("job_tokens_per_s_steady", job_steady, "tokens/s")
        result("bare_tokens_per_s_steady", bare_steady, "tokens/s")
        result("job_over_bare_steady", ratio(job_steady, bare_steady), "x")
        job_e2e = median([r["summary"]["tokens_seen"] / r["seconds"] for r in job_runs])
        bare_e2e = median([r["tokens"] / r["seconds"] for r in bare_runs])
        result("job_tokens_per_s_end_to_end", job_e2e, "tokens/s")
        result("bare_tokens_per_s_end_to_end", bare_e2e, "tokens/s")
        result("job_over_bare_end_to_end", ratio(job_e2e, bare_e2e), "x")
        result("job_startup_ray_init_s", median([r["ray_init_s"] for r in job_runs]), "s")
        result("job_wall_s", median([r["seconds"] for r in job_runs]), "s")
        result("job_train_seconds_as_reported", median([r["summary"]["train_seconds"] for r in job_runs]), "s")
        result("bare_wall_s", median([r["seconds"] for r in bare_runs]), "s")
        result("bare_data_wait_fraction", median([r["data_wait_fraction"] for r in bare_runs]), "x")
        # The job does not report its data wait; what its steady step spends beyond the bare
        # loop's whole step (which includes the bare loop's own data preparation) bounds it.
        job_step = median([median([h["step_time_s"] for h in r["summary"]["history"][1:]] or [float("nan")])
                           for r in job_runs])
        bare_step = median([r["steady_step_s"] for r in bare_runs])
        result("job_steady_step_excess_fraction", ratio(job_step - bare_step, job_step), "x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
