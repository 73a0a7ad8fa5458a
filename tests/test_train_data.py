"""Training rows → batches: bad rows are dropped and counted, never fatal."""

import io

import torch

import pytest
from PIL import Image

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import Storage
from pipelines.finetune.batches import BatchRecipe, MicroBatchCollate, prepare_micro_batch
from pipelines.finetune.data import COUNTER_NAMES, DataCounters, RowFormat, encode_row
from pipelines.finetune.plan import EMPTY_SLOT, RowIndex
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


def test_a_micro_batch_keeps_its_slots_and_counts_what_was_dropped(processor, tmp_path):
    rows = [{"image": png(), "caption": f"caption {i}"} for i in range(5)] + [{"image": None, "caption": "w " * 300}]
    path = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)  # rows span two row groups
    index = RowIndex((str(path),), ((4, 2),))
    recipe = BatchRecipe(index, ["image", "caption"], RowFormat(max_length=64, length_policy="drop"), processor,
                         Storage.from_environment())
    plan = np.array([5, 0, 4, EMPTY_SLOT])  # too long, two images (from both groups), nothing
    table = prepare_micro_batch(pa.table({"micro": [0] * 4, "row": plan}), recipe)
    batch = MicroBatchCollate(processor.image_size)(table)
    assert batch["input_ids"].shape[0] == 4 and batch["rows"].tolist() == plan.tolist()
    trains = (batch["labels"] != IGNORE_INDEX).any(dim=1).tolist()
    assert trains == [False, True, True, False], "dropped rows and empty slots stay, without labels"
    counts = dict(zip(COUNTER_NAMES, batch["counters"].tolist()))
    assert counts["rows_used"] == 2 and counts["dropped_too_long"] == 1
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[0] == 2
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] == lengths[3] == 1 and lengths[1] > processor.image_seq_length
    expected = processor.encode_conversation([{"role": "user", "content": "Describe the image."},
                                              {"role": "assistant", "content": "caption 4"}], has_image=True)
    assert batch["input_ids"][2, : len(expected["input_ids"])].tolist() == expected["input_ids"]


def test_a_pickled_recipe_opens_without_torch_and_prepares_the_same_micro_batch(processor, tmp_path):
    """Ray Data's split coordinator only unpickles the recipe: that must not import torch or
    transformers (the processor's ~3 s of CPU, paid in every such actor). The data task that
    uses the recipe gets the processor back, and with it the same micro-batch."""
    import pickle
    import subprocess
    import sys

    from conftest import REPO

    path = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist([{"image": png(), "caption": f"caption {i}"} for i in range(3)]), path)
    recipe = BatchRecipe(RowIndex((str(path),), ((3,),)), ["image", "caption"], RowFormat(), processor,
                         Storage.from_environment())
    (tmp_path / "recipe.pkl").write_bytes(pickle.dumps(recipe))
    probe = ("import pickle, sys; recipe = pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(sorted(m for m in ('torch', 'transformers', 'trol') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "recipe.pkl")], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout

    refs = pa.table({"micro": [0, 0], "row": [2, 0]})
    again = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(recipe))))  # as passed on twice
    assert again.processor.image_size == processor.image_size
    assert prepare_micro_batch(refs, again).equals(prepare_micro_batch(refs, recipe))
