"""Released config.json files as transformers 4.36-4.45 wrote them convert (the tiny layouts
write the "maximal" form: every generic key of that era's to_dict()). Each key is used,
ignored (one log line names them) or refused (naming key and value); the converted configs
hold only the backbone's own fields; TroL-3.8B's logits equal the reference from the
equations, long-rope positions past 4,096 included."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLVisionConfig, LlamaConfig, Phi3Config

from released_layouts import GENERIC_4X, VIT, write_internlm2_release, write_phi3_release
from released_reference import Phi3Reference, internvit_features
from test_convert_released import released_and_converted, released_tensors
from trol import TroLForConditionalGeneration, TroLProcessor
from trol.convert import ConversionError, convert_released

# What each family's conversion reads (maps, or checks like the nested model types); every other
# key of the maximal config is ignored.
USED = {
    "internlm2": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range",
                  "rope_theta", "rope_scaling", "bias", "bos_token_id", "eos_token_id"},
    "phi3": {"vision_config", "llm_config", "force_image_size", "downsample_ratio"}
    | {f"llm_config.{k}" for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "resid_pdrop", "embd_pdrop",
                                    "attention_dropout", "hidden_act", "max_position_embeddings",
                                    "original_max_position_embeddings", "initializer_range", "rms_norm_eps",
                                    "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id",
                                    "sliding_window", "model_type")}
    | {f"vision_config.{k}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                       "image_size", "patch_size", "qkv_bias", "qk_normalization", "norm_type",
                                       "layer_norm_eps", "hidden_act", "model_type")},
}
MAX_LOGIT_DIFF = 1e-4


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    return released_and_converted(tmp_path_factory.mktemp("internlm2"), write_internlm2_release)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return released_and_converted(tmp_path_factory.mktemp("phi3"), write_phi3_release)


def flat_keys(config: dict, nested: tuple[str, ...] = ()) -> set[str]:
    keys = set(config)
    for name in nested:
        keys |= {f"{name}.{k}" for k in config[name]}
    return keys


def test_every_key_of_a_maximal_config_is_used_or_ignored(internlm2, phi3):
    for family, (src, dst, report), nested in (("internlm2", internlm2, ()), ("phi3", phi3, ("llm_config", "vision_config"))):
        raw = json.loads((src / "config.json").read_text())
        seen = flat_keys(raw, nested)
        ignored = set(report["ignored_config_keys"])
        assert set(GENERIC_4X) <= set(raw), "the layout writes every generic key of transformers 4.x"
        assert ignored | USED[family] == seen and not ignored & USED[family], family
        assert json.loads((dst / "conversion.json").read_text())["ignored_config_keys"] == sorted(ignored)
    assert {"llm_config.add_cross_attention", "llm_config.prefix", "llm_config.pruned_heads", "llm_config.auto_map",
            "vision_config.use_flash_attn", "vision_config.drop_path_rate", "ps_version", "template", "select_layer",
            "_commit_hash"} <= set(phi3[2]["ignored_config_keys"])
    assert {"auto_map", "attn_implementation", "tie_word_embeddings", "max_length", "torch_dtype"} <= set(
        internlm2[2]["ignored_config_keys"])


def test_converted_configs_hold_only_the_backbones_fields(internlm2, phi3):
    allowed = {"llama": set(LlamaConfig().to_dict()), "phi3": set(Phi3Config().to_dict()),
               "internvl_vision": set(InternVLVisionConfig().to_dict())}
    for _, dst, _ in (internlm2, phi3):
        saved = json.loads((dst / "config.json").read_text())
        for part in ("text_config", "vision_config"):
            if saved[part]["model_type"] in allowed:
                extra = set(saved[part]) - allowed[saved[part]["model_type"]]
                assert not extra, f"{part} carries {sorted(extra)}"
        assert not {"add_cross_attention", "prefix", "pruned_heads", "auto_map"} & set(saved["text_config"])
    text = json.loads((phi3[1] / "config.json").read_text())["text_config"]
    assert text["rope_parameters"]["rope_type"] == "longrope" and text["sliding_window"] == 262144
    assert len(text["rope_parameters"]["long_factor"]) == 8


def test_ignored_keys_are_logged_in_one_line(phi3, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trol.convert"):
        convert_released(str(phi3[0]), str(tmp_path / "again"))
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and "llm_config.add_cross_attention" in lines[0] and "vision_config.use_flash_attn" in lines[0]


def _phi3_inputs(dst: Path):
    processor = TroLProcessor.from_pretrained(dst)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (28, 70, 3), dtype=np.uint8)),  # 3 tiles + thumbnail
              Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))]  # 1 tile
    text = [processor.build_prompt("Describe the image."), processor.build_prompt("What is it?")]
    return processor(text=text, images=images)


@pytest.mark.slow
def test_phi3_logits_equal_the_reference_also_past_4096_positions(phi3):
    src, dst, _ = phi3
    model = TroLForConditionalGeneration.from_pretrained(dst).eval()
    W = released_tensors(src)
    llm = json.loads((src / "config.json").read_text())["llm_config"]
    reference = Phi3Reference(W, llm, torch.load(src / "trol_gating.pt", weights_only=True))
    batch = _phi3_inputs(dst)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0].sum() != mask[1].sum(), "rows must be left-padded"
    embeds = W["language_model.model.embed_tokens.weight"][ids].clone()
    is_image = ids == model.config.image_token_id
    embeds[is_image] = internvit_features(W, VIT, batch["pixel_values"], ratio=0.5).reshape(-1, embeds.shape[-1])
    long_ids = torch.randint(0, llm["vocab_size"], (1, 4200), generator=torch.Generator().manual_seed(0))
    long_ids[long_ids == model.config.image_token_id] = 0  # text only
    with torch.no_grad():
        ours = model(**batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ref = reference.logits(embeds, mask)
        assert (ours - ref)[mask.bool()].abs().max() <= MAX_LOGIT_DIFF
        # 4,200 tokens: positions past original_max_position_embeddings switch to the long factors.
        ours_long = model(input_ids=long_ids).logits
        ref_long = reference.logits(W["language_model.model.embed_tokens.weight"][long_ids], torch.ones_like(long_ids))
        assert (ours_long - ref_long).abs().max() <= MAX_LOGIT_DIFF
        # The same first 4,000 tokens alone stay on the short factors: their logits differ.
        ours_short = model(input_ids=long_ids[:, :4000]).logits
    assert (ours_long[:, :4000] - ours_short).abs().max() > 100 * MAX_LOGIT_DIFF, "the long factors took effect"


def _edited_copy(src: Path, folder: Path, edit) -> Path:
    """The released folder with its config.json edited (other files linked, not copied)."""
    folder.mkdir()
    for path in src.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


REFUSED = [
    ("internlm2", lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling="),
    ("internlm2", lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings=True"),
    ("internlm2", lambda c: c.update(pruned_heads={"0": [1]}), "pruned_heads="),
    ("internlm2", lambda c: c.update(rope_mystery=3.0), "rope_mystery=3.0"),
    ("phi3", lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "short_factor": [1] * 8,
                                                           "long_factor": [1] * 8}), "llm_config.rope_scaling"),
    ("phi3", lambda c: c["llm_config"].update(is_encoder_decoder=True), "llm_config.is_encoder_decoder=True"),
    ("phi3", lambda c: c["vision_config"].update(num_channels=1), "vision_config.num_channels=1"),
    ("phi3", lambda c: c.update(select_layer=-2), "select_layer=-2"),
    ("phi3", lambda c: c.update(quantization_config={"load_in_4bit": True}), "quantization_config"),
]


@pytest.mark.parametrize("family, edit, named", REFUSED, ids=[r[2].rstrip("=") for r in REFUSED])
def test_keys_that_would_change_the_numbers_fail_naming_key_and_value(internlm2, phi3, tmp_path, family, edit, named):
    src = _edited_copy((internlm2 if family == "internlm2" else phi3)[0], tmp_path / "edited", edit)
    with pytest.raises(ConversionError, match=named.replace("[", r"\[")):
        convert_released(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_saved_config_converts_like_its_full_to_dict(internlm2, phi3, tmp_path):
    """save_pretrained wrote the diff against the defaults (nested configs whole): same result."""
    def diff(config: dict) -> None:
        for key, default in GENERIC_4X.items():
            if key in config and config[key] == default and key not in ("transformers_version", "model_type"):
                del config[key]

    for name, (src, dst, _) in (("internlm2", internlm2), ("phi3", phi3)):
        folder = _edited_copy(src, tmp_path / name, diff)
        assert len(json.loads((folder / "config.json").read_text())) < len(json.loads((src / "config.json").read_text()))
        convert_released(str(folder), str(tmp_path / f"{name}-out"))
        assert json.loads((tmp_path / f"{name}-out" / "config.json").read_text()) == json.loads((dst / "config.json").read_text())
