"""TroLProcessor: preprocessing of every PIL mode, expansion, padding, labels, persistence."""

import io

import numpy as np
import pytest
from PIL import Image

from trol import TroLProcessor
from trol.processing import IGNORE_INDEX, to_rgb
from trol_helpers import PROMPT, tiny


@pytest.fixture(scope="module")
def processor():
    return tiny("llama")[1]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_pil_mode_becomes_normalised_rgb(processor, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    arr = processor.preprocess_image(image)
    assert arr.dtype == np.float32 and arr.shape == (3, processor.image_size, processor.image_size)
    assert np.isfinite(arr).all() and arr.std() > 0.05


def test_transparency_goes_onto_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert 120 < to_rgb(half).getpixel((0, 0))[0] < 135


def test_jpeg_cmyk_round_trip(processor):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (255, 0, 0)).convert("CMYK").save(buf, format="JPEG")
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert image.mode == "CMYK"
    red = to_rgb(image).getpixel((10, 10))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_image_tokens_are_expanded_and_rows_left_padded(processor):
    text = [processor.build_prompt(PROMPT), processor.build_prompt("a much longer prompt " * 3, with_image=False)]
    batch = processor(text=text, images=[Image.new("RGB", (8, 8)), None])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[0] == processor.image_token_id).sum() == processor.image_seq_length
    assert (ids[1] == processor.image_token_id).sum() == 0
    assert batch["pixel_values"].shape[0] == 1
    short = int(np.argmin(mask.sum(1).numpy()))
    pad = mask.shape[1] - int(mask[short].sum())
    assert mask[short, :pad].sum() == 0 and mask[short, pad:].all()
    assert (ids[short, :pad] == processor.tokenizer.pad_token_id).all()
    assert ids[short, pad] == processor.tokenizer.bos_token_id


def test_labels_cover_assistant_tokens_only(processor):
    turns = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "a handwritten digit seven"},
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "black on white"},
    ]
    enc = processor.encode_conversation(turns, has_image=True)
    ids, labels = enc["input_ids"], enc["labels"]
    learned = processor.tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert learned == "a handwritten digit seven<|end|>\nblack on white<|end|>\n"
    assert ids.count(processor.image_token_id) == processor.image_seq_length
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == processor.image_token_id)
    # The prompt part tokenizes exactly as the generation prompt does.
    prompt = processor(text=[processor.build_prompt(PROMPT)], images=[Image.new("RGB", (8, 8))])["input_ids"][0].tolist()
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX


def test_length_limit_truncates_text_but_never_an_image(processor):
    turns = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "word " * 50}]
    full = processor.encode_conversation(turns, has_image=True)
    cut = processor.encode_conversation(turns, has_image=True, max_length=len(full["input_ids"]) - 10)
    assert cut["truncated"] and len(cut["input_ids"]) == len(full["input_ids"]) - 10
    assert processor.encode_conversation(turns, has_image=True, max_length=processor.image_seq_length) is None
    text_only = processor.encode_conversation(turns[:1] + [{"role": "assistant", "content": "hi"}], has_image=False)
    assert processor.image_token_id not in text_only["input_ids"] and not text_only["truncated"]
    with pytest.raises(ValueError, match="placeholders"):
        processor.encode_conversation([{"role": "user", "content": "<image> <image>"}], has_image=True)


def test_save_and_load_keep_settings_and_chat_template(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = TroLProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == processor.image_seq_length
    assert loaded.image == processor.image and loaded.chat == processor.chat
    via_template = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + PROMPT}], add_generation_prompt=True, tokenize=False)
    assert via_template == loaded.tokenizer.bos_token + loaded.build_prompt(PROMPT)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        TroLProcessor.from_pretrained(empty)
