"""`make demo`: the product on this machine, end to end, with real captions.

1. Once (then cached): prepare scikit-learn's digits as Parquet shards (captions, and each
   training image also as a 10-way multiple-choice question), and fine-tune a tiny random
   TroL on them with Ray Train (2 CPU workers, DDP) — about eight minutes.
2. Build input shards: scikit-image's sample photos and held-out handwritten digits.
3. Run the caption job (shard readers, predictor actor, on Ray) on them and print the captions.
4. Evaluate the untrained and the fine-tuned model on the held-out digits as 10-way
   multiple choice, and print both side by side.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

OUT = Path("demo_out")
FINETUNE_SPEC = Path(__file__).parent / "examples" / "finetune_digits.yaml"
SAMPLES = ["astronaut", "camera", "cat", "coffee", "chelsea", "rocket", "coins", "horse", "page"]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def trained_model() -> Path:
    """The digits model from the example fine-tuning spec, trained on first use."""
    model = OUT / "runs" / "digits" / "model"
    if (model / "config.json").is_file() and _trained_with_choice_rows(OUT / "runs" / "digits"):
        return model
    from jobs.finetune import main as finetune
    from jobs.prepare import main as prepare
    from trol.tiny import main as tiny

    summary = OUT / "digits" / "_SUMMARY.json"
    if not summary.is_file() or not json.loads(summary.read_text())["options"].get("choice_rows"):
        # Without the multiple-choice rows the model answers that benchmark at chance.
        prepare(["digits", "--output", str(OUT / "digits"), "--image-size", "32", "--overwrite", "--choice-rows"])
    if not (OUT / "tiny-untrained" / "config.json").is_file():
        tiny([str(OUT / "tiny-untrained")])
    print("demo: fine-tuning a tiny TroL on digits (first run only, ~8 min)", flush=True)
    if finetune([str(FINETUNE_SPEC)]) != 0:
        raise SystemExit("demo: fine-tuning failed")
    return model


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


def evaluation_table(trained: Path) -> str:
    """The untrained and the fine-tuned model on the held-out digits as 10-way multiple
    choice (`jobs/examples/evaluate_digits.yaml`), side by side, and each accuracy checked
    against a recount of its predictions file."""
    import pyarrow.parquet as pq

    from jobs.evaluate import main as evaluate
    from jobs.prepare import main as prepare
    from pipelines.evaluate.report import compare_table

    bench = OUT / "digits-choice"
    if not (bench / "_SUMMARY.json").is_file():
        prepare(["eval-digits", "--output", str(bench), "--image-size", "32", "--overwrite"])
    runs, recounts = {}, []
    for label, model in (("untrained", OUT / "tiny-untrained"), ("fine-tuned", trained)):
        out = OUT / "eval" / label
        if evaluate([str(Path(__file__).parent / "examples" / "evaluate_digits.yaml"), "--set", f"model={model}",
                     "--set", f"output={out}", "--set", f"benchmarks.0.data={bench}"]) != 0:
            raise SystemExit(f"demo: evaluating the {label} model failed")
        runs[label] = json.loads((out / "metrics.json").read_text())
        correct = pq.read_table(out / "predictions.parquet").column("correct").to_pylist()
        overall = runs[label]["benchmarks"]["digits"]["overall"]
        if (overall["correct"], overall["count"]) != (sum(correct), len(correct)):
            raise SystemExit(f"demo: {label}: metrics.json says {overall['correct']}/{overall['count']}, "
                             f"predictions.parquet {sum(correct)}/{len(correct)}")
        recounts.append(f"{label} {sum(correct)}/{len(correct)}")
    table = compare_table(runs["fine-tuned"], runs["untrained"], this_label="fine-tuned", other_label="untrained")
    return f"{table}(recounted from predictions.parquet: {', '.join(recounts)})"


def input_shards(folder: Path) -> dict[str, int]:
    """Shard 0: scikit-image's photos (colour, grayscale, JPEG and PNG). Shard 1: held-out
    digits; returns their labels by id, to score the captions."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for i, name in enumerate(SAMPLES):
        arr = getattr(data, name)()
        image = Image.fromarray(arr.astype(np.uint8) * 255 if arr.dtype == bool else arr)
        photos.append({"id": name, "image": _encode(image, "JPEG" if i % 2 else "PNG")})
    test = pq.read_table(sorted(glob.glob(str(OUT / "digits" / "test" / "*.parquet")))).slice(0, 60).to_pylist()
    digits = [{"id": f"digit-{i:03d}", "image": row["image"]} for i, row in enumerate(test)]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    for k, rows in enumerate([photos, digits]):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"part-{k:05d}.parquet")
    return {f"digit-{i:03d}": row["label"] for i, row in enumerate(test)}


def main() -> int:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    from jobs.caption import main as caption
    from pipelines.prepare_digits import parse_digit

    model = trained_model()
    labels = input_shards(OUT / "inputs")
    captions = OUT / "captions"
    for stale in captions.glob("**/*"):  # the demo captions afresh each time
        if stale.is_file():
            stale.unlink()
    status = caption([str(Path(__file__).parent / "examples" / "caption_local.yaml"),
                      "--set", f"input={OUT / 'inputs'}", "--set", f"output={captions}",
                      "--set", f"model={model}", "--set", "batch_size=32"])
    if status != 0:
        return status
    rows = pq.read_table(sorted(glob.glob(str(captions / "*.parquet")))).to_pylist()
    print("\ncaptions:")
    for row in rows[: len(SAMPLES) + 12]:
        text = repr(row["caption"]) if row["error"] is None else f"error: {row['error']}"
        print(f"  {row['id']:>12}: {text}")
    scored = [r for r in rows if r["id"] in labels]
    right = sum(parse_digit(r["caption"] or "") == labels[r["id"]] for r in scored)
    print(f"\nheld-out digits captioned correctly: {right}/{len(scored)} ({right / max(len(scored), 1):.0%})")
    print("(the model was trained on digits only, so it calls every photo a digit)")
    print("\nheld-out digits as 10-way multiple choice (python -m jobs.evaluate):")
    print(evaluation_table(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
