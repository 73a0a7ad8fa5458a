"""`make demo`: the product on this machine, end to end, with real captions.

1. Once (then cached): prepare scikit-learn's digits as Parquet shards, and fine-tune a
   tiny random TroL on them with Ray Train (2 CPU workers, DDP) — about three minutes.
2. Build input shards: scikit-image's sample photos and held-out handwritten digits.
3. Run the caption job (shard readers, predictor actor, on Ray) on them and print the captions.
"""

from __future__ import annotations

import glob
import io
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
    if (model / "config.json").is_file():
        return model
    from jobs.finetune import main as finetune
    from jobs.prepare import main as prepare
    from trol.tiny import main as tiny

    if not (OUT / "digits" / "_SUMMARY.json").is_file():
        prepare(["digits", "--output", str(OUT / "digits"), "--image-size", "32", "--overwrite"])
    if not (OUT / "tiny-untrained" / "config.json").is_file():
        tiny([str(OUT / "tiny-untrained")])
    print("demo: fine-tuning a tiny TroL on digits (first run only, ~3 min)", flush=True)
    if finetune([str(FINETUNE_SPEC)]) != 0:
        raise SystemExit("demo: fine-tuning failed")
    return model


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
