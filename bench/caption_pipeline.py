"""What the caption job costs over a bare loop, and what batching buys.

The job runs through its public entrypoint (`jobs.caption.main`, what `python -m jobs.caption
SPEC.yaml --set ...` calls) on a private local Ray started the way the job starts one; the
bare loop reads the same shards with pyarrow, decodes with PIL and captions with
trol.Captioner in this process. Same model (random weights whose end-of-turn token can never
win, so every row generates exactly max_new_tokens), data, batch size and torch threads (the
job's predictor actor holds one CPU, so Ray gives it one thread). Then, in-process: batched
captioning vs one image at a time through generate.

    python -m bench.caption_pipeline [--size tiny|small] [--images N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from .common import interleaved, median, note, parse_args, print_machine, ratio, result
from .data import decode, read_rows, write_image_shards
from .models import SHAPES, save_model

# (images, shards, batch size, new tokens, job/bare repeats, batch-1 comparison images)
WORKLOAD = {"tiny": (32, 4, 8, 4, 1, 16), "small": (96, 4, 16, 16, 2, 16)}
PROMPT = "Describe the image."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--actor-threads", type=int, default=1,
                        help="torch threads of the bare loop: the job's actor (1 CPU) gets one")
    parser.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temp folder)")


def start_local_ray() -> float:
    """What jobs.ray_session does when no cluster is named: a private Ray, no dashboard.
    Never `address="auto"`: on a shared machine that could join someone else's Ray."""
    import ray

    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - started


def run_job(model: Path, inputs: Path, output: Path, batch: int, new_tokens: int, work: Path) -> dict:
    """One caption job, Ray start-up included; returns its timings and _SUMMARY.json."""
    import ray

    from jobs.caption import main as caption_main

    spec = {"input": str(inputs), "output": str(output), "model": str(model), "id_columns": ["id"],
            "prompt": PROMPT, "generation": {"max_new_tokens": new_tokens, "do_sample": False},
            "batch_size": batch, "actors": 1, "gpus_per_actor": 0, "dtype": "float32"}
    spec_path = work / f"{output.name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    ray_seconds = start_local_ray()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the job's own report, not ours
            status = caption_main([str(spec_path), "--progress-every", "3600"])
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    if status != 0:
        raise RuntimeError(f"caption job exited {status}")
    tokens = pq.read_table(sorted(output.glob("*.parquet")), columns=["num_tokens"]).column("num_tokens").to_pylist()
    summary = json.loads((output / "_SUMMARY.json").read_text())
    return {"seconds": seconds, "ray_init_s": ray_seconds, "tokens": tokens, "summary": summary}


def run_bare(model: Path, inputs: Path, output: Path, batch: int, new_tokens: int) -> dict:
    """The loop a user would write without Ray: load, then read → decode → caption → write."""
    from trol import Captioner

    started = time.perf_counter()
    captioner = Captioner(str(model), dtype="float32", device="cpu")
    loaded = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    first_batch_done, tokens, rows_done = None, [], 0
    for shard in sorted(inputs.glob("*.parquet")):
        rows = pq.read_table(shard).to_pylist()
        out_rows = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            pixels = [captioner.processor.prepare_image(decode(r["image"])) for r in chunk]
            for row, cap in zip(chunk, captioner.caption(pixels, PROMPT, max_new_tokens=new_tokens)):
                out_rows.append({"id": row["id"], "caption": cap.text, "num_tokens": cap.num_tokens})
                tokens.append(cap.num_tokens)
            rows_done += len(chunk)
            if first_batch_done is None:
                first_batch_done, first_rows = time.perf_counter(), rows_done
        pq.write_table(pa.Table.from_pylist(out_rows), output / shard.name)
    finished = time.perf_counter()
    steady = (rows_done - first_rows) / (finished - first_batch_done) if finished > first_batch_done else float("nan")
    return {"seconds": finished - started, "load_s": loaded - started, "tokens": tokens,
            "first_output_s": first_batch_done - started, "steady_images_per_s": steady}


def batching_gain(model: Path, inputs: Path, count: int, batch: int, new_tokens: int, repeats: int) -> dict:
    """Steady-state images/s batched vs one image per generate call, same images."""
    from trol import Captioner

    captioner = Captioner(str(model), dtype="float32", device="cpu")
    rows = read_rows(inputs)[:count]
    pixels = [captioner.processor.prepare_image(decode(r["image"])) for r in rows]

    def batched() -> None:
        for i in range(0, len(pixels), batch):
            captioner.caption(pixels[i:i + batch], PROMPT, max_new_tokens=new_tokens)

    def one_by_one() -> None:
        for p in pixels:
            captioner.caption([p], PROMPT, max_new_tokens=new_tokens)

    times = interleaved({"batched": batched, "one_by_one": one_by_one}, repeats)
    return {k: len(pixels) / median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], add_arguments, argv)
    images, shards, batch, new_tokens, repeats, batch1_images = WORKLOAD[args.size]
    images, batch = args.images or images, args.batch_size or batch
    new_tokens, repeats = args.new_tokens or new_tokens, args.repeats or repeats
    torch.set_num_threads(args.actor_threads)
    print_machine("cpu", "float32", size=args.size, images=images, batch=batch, new_tokens=new_tokens)
    note(f"{SHAPES[args.size]}; {images} images in {shards} shards; job vs bare loop {repeats}x each, "
         f"alternating, after one warm-up of each")
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        work = Path(args.workdir or tmp)
        model = save_model(args.size, work / "model", eos_reachable=False)
        inputs = work / "inputs"
        write_image_shards(inputs, images, shards)
        warm = work / "warm-inputs"
        write_image_shards(warm, batch, 1, seed=1)
        # Warm-up (page cache, lazy imports, Ray's first worker start), not timed.
        run_job(model, warm, work / "job-warm", batch, new_tokens, work)
        run_bare(model, warm, work / "bare-warm", batch, new_tokens)
        job_runs, bare_runs = [], []
        for r in range(repeats):
            order = ("job", "bare") if r % 2 == 0 else ("bare", "job")
            for name in order:
                if name == "job":
                    job_runs.append(run_job(model, inputs, work / f"job-{r}", batch, new_tokens, work))
                else:
                    bare_runs.append(run_bare(model, inputs, work / f"bare-{r}", batch, new_tokens))
        for run in job_runs + bare_runs:
            if len(run["tokens"]) != images or set(run["tokens"]) != {new_tokens}:
                raise RuntimeError(f"unequal work: expected {images} rows of {new_tokens} tokens")
        job_e2e = images / median([r["seconds"] for r in job_runs])
        bare_e2e = images / median([r["seconds"] for r in bare_runs])
        job_steady = median([r["summary"].get("steady_images_per_s") or float("nan") for r in job_runs])
        bare_steady = median([r["steady_images_per_s"] for r in bare_runs])
        result("job_images_per_s_end_to_end", job_e2e, "images/s")
        result("bare_images_per_s_end_to_end", bare_e2e, "images/s")
        result("job_over_bare_end_to_end", ratio(job_e2e, bare_e2e), "x")
        result("job_images_per_s_steady", job_steady, "images/s")
        result("bare_images_per_s_steady", bare_steady, "images/s")
        result("job_over_bare_steady", ratio(job_steady, bare_steady), "x")
        result("job_startup_ray_init_s", median([r["ray_init_s"] for r in job_runs]), "s")
        first_output = [r["summary"].get("startup_seconds") for r in job_runs]
        if all(v is not None for v in first_output):
            result("job_startup_to_first_output_s", median(first_output), "s")
        result("bare_startup_model_load_s", median([r["load_s"] for r in bare_runs]), "s")
        result("bare_startup_to_first_output_s", median([r["first_output_s"] for r in bare_runs]), "s")

        rates = batching_gain(model, inputs, batch1_images, batch, new_tokens, repeats)
        result(f"batched_{batch}_images_per_s", rates["batched"], "images/s")
        result("batch_1_images_per_s", rates["one_by_one"], "images/s")
        result(f"batched_{batch}_over_batch_1", ratio(rates["batched"], rates["one_by_one"]), "x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
