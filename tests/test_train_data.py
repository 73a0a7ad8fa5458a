"""Training rows → batches: bad rows are dropped and counted, never fatal."""

import io

import pytest
from PIL import Image

from pipelines.train_data import COUNTER_NAMES, DataCounters, RowFormat, encode_row, model_batches
from trol.processing import IGNORE_INDEX
from trol_helpers import tiny


@pytest.fixture(scope="module")
def processor():
    return tiny("llama")[1]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_worker_holds_every_counter_so_the_reduction_has_one_shape():
    a, b = DataCounters(), DataCounters()
    a.add("truncated")
    assert len(a.values()) == len(b.values()) == len(COUNTER_NAMES)
    with pytest.raises(KeyError):
        a.add("no_such_counter")


@pytest.mark.parametrize("row, counter", [
    ({"image": b"not an image", "caption": "x"}, "dropped_bad_image"),
    ({"image": None, "caption": "look <image> here"}, "dropped_bad_text"),
    ({"image": png(), "caption": "a reply with <image> in it"}, "dropped_bad_text"),
    ({"image": png(), "conversations": [{"from": "gpt", "value": "first"}]}, "dropped_bad_text"),
    ({"image": png(), "caption": None, "conversations": None}, "dropped_bad_text"),
    ({"image": png(), "caption": "word " * 400}, "truncated"),
])
def test_bad_rows_are_counted_not_raised(processor, row, counter):
    counters = DataCounters()
    fmt = RowFormat(max_length=64)
    item = encode_row(row, processor, fmt, counters)
    assert counters.counts[counter] == 1
    if counter == "truncated":
        ids, labels = item[0]["input_ids"], item[0]["labels"]
        assert len(ids) == 64 and ids.count(processor.image_token_id) == processor.image_seq_length
        assert all(l == IGNORE_INDEX for t, l in zip(ids, labels) if t == processor.image_token_id)
    else:
        assert item is None


def test_drop_policy_and_batches(processor):
    rows = [{"image": png(), "caption": f"caption {i}"} for i in range(5)] + [{"image": None, "caption": "w " * 300}]
    counters = DataCounters()
    batches = list(model_batches(rows, processor, RowFormat(max_length=64, length_policy="drop"), 2, counters))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert counters.counts["rows_used"] == 5 and counters.counts["dropped_too_long"] == 1
    assert all(b["pixel_values"].shape[0] == b["input_ids"].shape[0] for b in batches)
