"""`make demo`: caption scikit-image's packaged sample images with a tiny TroL model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = ["astronaut", "camera", "cat", "coffee", "chelsea", "rocket", "coins", "horse", "page", "immunohistochemistry"]


def sample_images() -> dict[str, Image.Image]:
    from skimage import data

    out = {}
    for name in SAMPLES:
        arr = getattr(data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        out[name] = Image.fromarray(arr)
    return out


def main() -> int:
    from trol import Captioner
    from trol.tiny import build_tiny

    model_dir = Path(".cache/demo-model")
    if not (model_dir / "config.json").is_file():
        model, processor = build_tiny("llama", "full")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    captioner = Captioner(str(model_dir), dtype="float32")
    images = sample_images()
    pixels = [captioner.processor.preprocess_image(im) for im in images.values()]
    start = time.perf_counter()
    results = captioner.caption(pixels, "Describe the image.", max_new_tokens=12)
    seconds = time.perf_counter() - start
    for name, result in zip(images, results):
        print(f"{name:>22}: {result.text!r} ({result.num_tokens} tokens)")
    print(f"{len(results)} images in {seconds:.2f}s ({len(results) / seconds:.1f} images/s, random tiny model)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
