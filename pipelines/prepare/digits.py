"""scikit-learn's bundled 8x8 digits (no download) → train/ and test/ shards with captions
such as "a handwritten digit seven": the data of the end-to-end "it really learns" test."""

from __future__ import annotations

import io
import logging
import math
import re
import time

import numpy as np
from PIL import Image

from .output import (
    DEFAULT_DIGITS_SHARD_ROWS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_TEST_FRACTION,
    DIGITS_SCHEMA,
    DIGIT_PROMPT,
    DIGIT_WORDS,
    IMAGE_TOKEN,
    PrepareError,
    PrepareSummary,
    Resample,
    ShardSink,
    check_shard_rows,
    prepare_output,
    write_summary,
)

log = logging.getLogger(__name__)

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


# --- Digits -------------------------------------------------------------------------------


def digit_caption(label: int) -> str:
    """0..9 -> "a handwritten digit zero" ... "a handwritten digit nine"."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be 0..9 (got {label!r})")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def parse_digit(text: str) -> int | None:
    """The one digit a caption names (word or numeral), or None when it names none or
    several different ones, so an evaluation never credits a hedged caption."""
    found: set[int] = set()
    for match in _DIGIT_RE.finditer(text):
        token = match.group(1).lower()
        found.add(int(token) if token.isdigit() else DIGIT_WORDS.index(token))
    return found.pop() if len(found) == 1 else None


def _choice_row(row: dict) -> dict:
    """The same image asked as `prepare eval-digits` asks it, answered with the letter."""
    from ..evaluate.choices import LETTERS, build_choice_prompt
    from .benchmarks import DIGIT_QUESTION

    prompt = f"{IMAGE_TOKEN}\n{build_choice_prompt(DIGIT_QUESTION, list(DIGIT_WORDS))}"
    return {**row, "id": f"{row['id']}-choice", "conversations": [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": LETTERS[row["label"]]}]}


def render_digit(pixels: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE, resample: Resample = "nearest") -> bytes:
    """One 8x8 digit (values 0..16, 16 = full ink) -> PNG bytes of an RGB square.

    Drawn as dark ink on white like handwriting on paper. "nearest" keeps every source
    pixel as an exact block, so the original 8x8 grid can be read back from the image.
    """
    ink = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 16.0) * (255.0 / 16.0)
    gray = Image.fromarray(np.rint(255.0 - ink).astype(np.uint8))
    rgb = gray.resize((image_size, image_size), resample=_RESAMPLE[resample]).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def split_digits(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of row indices -> (train, test); same seed, same split."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    return np.asarray(train), np.asarray(test)


def prepare_digits(
    output: str,
    *,
    shard_rows: int = DEFAULT_DIGITS_SHARD_ROWS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    resample: Resample = "nearest",
    overwrite: bool = False,
    choice_rows: bool = False,
) -> PrepareSummary:
    """scikit-learn's 1797 digits -> OUTPUT/train/ and OUTPUT/test/ shards (+ _SUMMARY.json).

    Ids are "digits-NNNN" after the row in scikit-learn's array, so they are stable across
    seeds. Rows within each split are in the split's shuffled order. With `choice_rows`,
    each training image also gets a row "digits-NNNN-choice" that asks the 10-way
    multiple-choice question of `prepare eval-digits` and answers with the letter: a model
    trained only to describe digits does not follow that format (measured: chance level).
    """
    started = time.perf_counter()
    from sklearn.datasets import load_digits

    check_shard_rows(shard_rows)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 4096:
        raise PrepareError(f"--image-size must be a whole number of pixels from 8 to 4096 (got {image_size!r})")
    if resample not in _RESAMPLE:
        raise PrepareError(f"--resample must be one of {sorted(_RESAMPLE)} (got {resample!r})")
    digits = load_digits()
    images: np.ndarray = digits.images
    labels = np.asarray(digits.target, dtype=np.int64)
    n_classes = len(np.unique(labels))
    fraction_ok = not isinstance(test_fraction, bool) and isinstance(test_fraction, (int, float))
    # A stratified split needs every class on both sides; scikit-learn rounds the test size up.
    n_test = math.ceil(test_fraction * len(labels)) if fraction_ok else 0
    if not fraction_ok or not n_classes <= n_test <= len(labels) - n_classes:
        low, high = n_classes / len(labels), 1 - n_classes / len(labels)
        raise PrepareError(
            f"--test-fraction must put at least {n_classes} of the {len(labels)} images on each "
            f"side of the stratified split, i.e. lie between about {low:.3f} and {high:.3f} "
            f"(got {test_fraction!r})"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PrepareError(f"--seed must be a whole number from 0 to 2**32-1 (got {seed!r})")
    out = prepare_output(output, overwrite)
    summary = PrepareSummary(
        dataset="digits",
        output=output,
        options={
            "image_size": image_size,
            "test_fraction": test_fraction,
            "seed": seed,
            "resample": resample,
            "shard_rows": shard_rows,
            "choice_rows": choice_rows,
        },
    )
    train, test = split_digits(labels, test_fraction, seed)
    for split, indices in (("train", train), ("test", test)):
        sink = ShardSink(out, split, DIGITS_SCHEMA, shard_rows, DEFAULT_MAX_SHARD_BYTES)
        for i in indices:
            png = render_digit(images[i], image_size, resample)
            caption = digit_caption(int(labels[i]))
            row = {
                "id": f"digits-{int(i):04d}",
                "image": png,
                "label": int(labels[i]),
                "caption": caption,
                "conversations": [
                    {"role": "user", "content": DIGIT_PROMPT},
                    {"role": "assistant", "content": caption},
                ],
            }
            sink.add(row, len(png))
            if choice_rows and split == "train":
                sink.add(_choice_row(row), len(png))
        sink.flush()
        summary.shards.extend(sink.shards)
    summary.records_read = len(labels)
    summary.seconds = time.perf_counter() - started
    write_summary(out, summary)
    return summary
