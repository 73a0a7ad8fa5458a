"""Run the product end to end on this machine: fine-tune a tiny TroL on digits, caption photos and held-out digits, and score it.

`make demo` runs it; each stage prints its title, its own lines and its time:
1. prepare: scikit-learn's digits as Parquet shards (captions, and each training image also
   as a 10-way multiple-choice question), and a tiny random TroL (first run only).
2. fine-tune: the tiny TroL on digits with Ray Train, 2 CPU workers, DDP (first run only,
   about four minutes on 2 quiet cores; later runs reuse the model).
3. caption: the caption job on scikit-image's sample photos and held-out digits.
4. score: a table of sample captions and the held-out accuracy.
5. evaluate: the untrained and the fine-tuned model on the held-out digits as 10-way
   multiple choice (`python -m jobs.evaluate`), side by side.
Everything runs on one private local Ray, started by the first stage that needs it. A new
stage is a function taking the `Demo` and a line in STAGES.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

EXAMPLES = Path(__file__).parent / "examples"
FINETUNE_SPEC = EXAMPLES / "finetune_digits.yaml"
SAMPLES = ["astronaut", "camera", "cat", "coffee", "chelsea", "rocket", "coins", "horse", "page"]
DEFAULT_STEPS = 800  # the example spec's max_steps
STEP_LINES = 12  # training lines the demo shows, whatever the step count


@dataclass
class Demo:
    """What the stages share: where things go, and what earlier stages produced."""

    out: Path
    steps: int = DEFAULT_STEPS
    digits: int = 60
    questions: int | None = None  # held-out multiple-choice questions scored; None: all
    address: str | None = None
    labels: dict[str, int] = field(default_factory=dict)  # held-out digit id -> label
    rows: list[dict] = field(default_factory=list)  # caption output rows
    outputs: dict[str, Path] = field(default_factory=dict)  # what the user should open

    @property
    def model(self) -> Path:
        return self.out / "runs" / "digits" / "model"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def prepare(demo: Demo) -> None:
    from jobs.prepare import main as prepare_digits
    from trol.tiny import main as tiny

    summary = demo.out / "digits" / "_SUMMARY.json"
    if summary.is_file() and json.loads(summary.read_text())["options"].get("choice_rows"):
        print(f"  digits already in {demo.out / 'digits'}")
    else:  # without the multiple-choice rows the model answers that benchmark at chance
        argv = ["digits", "--output", str(demo.out / "digits"), "--image-size", "32", "--overwrite", "--choice-rows"]
        if prepare_digits(argv) != 0:
            raise SystemExit("demo: preparing digits failed")
    if not (demo.out / "tiny-untrained" / "config.json").is_file():
        tiny([str(demo.out / "tiny-untrained")])
    demo.outputs["training data"] = demo.out / "digits"


def _trained_with_choice_rows(run: Path) -> bool:
    """A model cached by an earlier demo, trained on captions only, is trained again."""
    import shutil

    try:
        spec = json.loads((run / "_SPEC.json").read_text())
        prepared = json.loads((Path(spec["data"]).parent / "_SUMMARY.json").read_text())
        if prepared["options"].get("choice_rows"):
            return True
    except (OSError, KeyError, ValueError):
        pass
    shutil.rmtree(run, ignore_errors=True)
    return False


def finetune(demo: Demo) -> None:
    from jobs.finetune import main as finetune_job

    demo.outputs["fine-tuned model"] = demo.model
    if (demo.model / "config.json").is_file() and _trained_with_choice_rows(demo.model.parent):
        print(f"  reusing {demo.model} (delete {demo.out / 'runs'} to train again)")
        return
    out = demo.out
    argv = [str(FINETUNE_SPEC), "--set", f"data={out / 'digits' / 'train'}",
            "--set", f"eval_data={out / 'digits' / 'test'}",
            "--set", f"output={out / 'runs'}", "--set", f"base_model={out / 'tiny-untrained'}",
            "--set", f"max_steps={demo.steps}", "--set", f"log_every={max(1, demo.steps // STEP_LINES)}",
            # A checkpoint (and its evaluation) at each third of the run: rounding the
            # interval down would add a fourth just before the end (266, 532, 798, 800).
            "--set", f"checkpoint_every={max(1, math.ceil(demo.steps / 3))}"]
    if demo.address:
        argv += ["--address", demo.address]
    if finetune_job(argv) != 0:
        raise SystemExit("demo: fine-tuning failed")


def input_shards(demo: Demo, folder: Path) -> None:
    """Shard 0: scikit-image's photos (colour, grayscale, JPEG and PNG). Shard 1: held-out
    digits, whose labels score the captions."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for i, name in enumerate(SAMPLES):
        arr = getattr(data, name)()
        image = Image.fromarray(arr.astype(np.uint8) * 255 if arr.dtype == bool else arr)
        photos.append({"id": name, "image": _encode(image, "JPEG" if i % 2 else "PNG")})
    test_shards = sorted(glob.glob(str(demo.out / "digits" / "test" / "*.parquet")))
    test = pq.read_table(test_shards).slice(0, demo.digits).to_pylist()
    digits = [{"id": f"digit-{i:03d}", "image": row["image"]} for i, row in enumerate(test)]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    for k, rows in enumerate([photos, digits]):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"part-{k:05d}.parquet")
    demo.labels = {f"digit-{i:03d}": row["label"] for i, row in enumerate(test)}


def caption(demo: Demo) -> None:
    from jobs.caption import main as caption_job

    input_shards(demo, demo.out / "inputs")
    captions = demo.out / "captions"
    for stale in captions.glob("**/*"):  # the demo captions afresh each time
        if stale.is_file():
            stale.unlink()
    argv = [str(EXAMPLES / "caption_local.yaml"), "--set", f"input={demo.out / 'inputs'}",
            "--set", f"output={captions}",
            "--set", f"model={demo.model}", "--set", "batch_size=32", "--progress-every", "600"]
    if demo.address:
        argv += ["--address", demo.address]
    status = caption_job(argv)
    if status != 0:
        raise SystemExit(status)
    demo.rows = pq.read_table(sorted(glob.glob(str(captions / "*.parquet")))).to_pylist()
    demo.outputs["captions"] = captions


def score(demo: Demo) -> None:
    from pipelines.prepare.digits import parse_digit

    shown = [r for r in demo.rows if r["id"] in SAMPLES] + [r for r in demo.rows if r["id"] in demo.labels][:8]
    width = max(len(r["id"]) for r in shown)
    print(f"  {'image':<{width}}  caption")
    for row in shown:
        text = row["caption"] if row["error"] is None else f"(error: {row['error']})"
        print(f"  {row['id']:<{width}}  {text}")
    scored = [r for r in demo.rows if r["id"] in demo.labels]
    right = sum(parse_digit(r["caption"] or "") == demo.labels[r["id"]] for r in scored)
    print(f"  held-out digits captioned correctly: {right}/{len(scored)} ({right / max(len(scored), 1):.0%})")
    print("  (the model learned digits only: photos get digit-like, or empty, captions)")


def evaluate(demo: Demo) -> None:
    """The untrained and the fine-tuned model on the held-out digits as 10-way multiple
    choice (`jobs/examples/evaluate_digits.yaml`), side by side; each accuracy is checked
    against a recount of its predictions file."""
    from jobs.evaluate import main as evaluate_job
    from jobs.prepare import main as prepare
    from pipelines.evaluate.report import compare_table

    bench = demo.out / "digits-choice"
    if not (bench / "_SUMMARY.json").is_file():
        if prepare(["eval-digits", "--output", str(bench), "--image-size", "32", "--overwrite"]) != 0:
            raise SystemExit("demo: preparing the multiple-choice digits failed")
    runs, recounts = {}, []
    for label, model in (("untrained", demo.out / "tiny-untrained"), ("fine-tuned", demo.model)):
        out = demo.out / "eval" / label
        argv = [str(EXAMPLES / "evaluate_digits.yaml"), "--set", f"model={model}", "--set", f"output={out}",
                "--set", f"benchmarks.0.data={bench}"]
        if demo.questions:
            argv += ["--set", f"benchmarks.0.limit={demo.questions}"]
        if demo.address:
            argv += ["--address", demo.address]
        if evaluate_job(argv) != 0:
            raise SystemExit(f"demo: evaluating the {label} model failed")
        runs[label] = json.loads((out / "metrics.json").read_text())
        correct = pq.read_table(out / "predictions.parquet").column("correct").to_pylist()
        overall = runs[label]["benchmarks"]["digits"]["overall"]
        if (overall["correct"], overall["count"]) != (sum(correct), len(correct)):
            raise SystemExit(f"demo: {label}: metrics.json says {overall['correct']}/{overall['count']}, "
                             f"predictions.parquet {sum(correct)}/{len(correct)}")
        recounts.append(f"{label} {sum(correct)}/{len(correct)}")
        demo.outputs[f"{label} eval"] = out
    table = compare_table(runs["fine-tuned"], runs["untrained"], this_label="fine-tuned", other_label="untrained")
    print("  " + table.rstrip("\n").replace("\n", "\n  "))
    print(f"  (recounted from predictions.parquet: {', '.join(recounts)})")


STAGES: list[tuple[str, Callable[[Demo], None]]] = [
    ("prepare digits and a tiny untrained TroL", prepare),
    ("fine-tune it on digits (Ray Train, 2 CPU workers)", finetune),
    ("caption sample photos and held-out digits (Ray)", caption),
    ("score the captions", score),
    ("evaluate the untrained and the fine-tuned model: held-out digits as multiple choice (Ray)", evaluate),
]


def run(demo: Demo, stages: list[tuple[str, Callable[[Demo], None]]] = STAGES) -> None:
    started = time.perf_counter()
    for i, (title, stage) in enumerate(stages, 1):
        print(f"\n[{i}/{len(stages)}] {title}", flush=True)
        t = time.perf_counter()
        stage(demo)
        print(f"[{i}/{len(stages)}] done in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"\ndemo: finished in {time.perf_counter() - started:.0f} s; outputs:")
    for what, where in demo.outputs.items():
        print(f"  {what:<16} {where}")


def main(argv: list[str] | None = None) -> int:
    from jobs.job_args import add_ray_arguments, summary

    parser = argparse.ArgumentParser(prog="trol demo", description=summary(__doc__))
    parser.add_argument("--output", default="demo_out",
                        help="folder for everything the demo makes (default %(default)s)")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_STEPS, help="fine-tuning steps (default %(default)s)")
    parser.add_argument("--digits", type=int, default=60, help="held-out digits to caption (default %(default)s)")
    parser.add_argument("--questions", type=int, default=None,
                        help="held-out multiple-choice questions to score (default: all)")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    # A log, not a terminal: no progress bars for 150k-parameter saves and loads.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    run(Demo(Path(args.output), steps=args.max_steps, digits=args.digits, questions=args.questions,
             address=args.address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
