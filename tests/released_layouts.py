"""Tiny random checkpoints in the released TroL layouts (same key names and structure, sizes
scaled down), written the way the hub folders are: config.json, sharded safetensors,
trol_gating.pt and tokenizer files made here.

config.json is "maximal": what the release's config classes' `to_dict()` gave under the
transformers 4.36-4.45 that wrote the released files, every generic key included, with
realistic values for what loading and saving set (architectures, auto_map, torch_dtype, ...).
`save_pretrained` writes a subset of it (generic keys at their defaults dropped, except in
TroL-3.8B's nested configs), so a converter that reads this reads the real files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from test_convert_tokenizer import release_like_config, training_sentences
from trol.tiny import build_tokenizer

# transformers 4.36-4.45 `PretrainedConfig.to_dict()`: the generic keys every config held, at
# their defaults (the same 56 keys throughout that range; generation defaults among them).
GENERIC_4X = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": None, "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "tie_word_embeddings": True, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "architectures": None, "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "tokenizer_class": None,
    "prefix": None, "bos_token_id": None, "pad_token_id": None, "eos_token_id": None, "sep_token_id": None,
    "decoder_start_token_id": None, "task_specific_params": None, "problem_type": None, "_name_or_path": "",
    "transformers_version": "4.41.2", "model_type": "",
}


def legacy_to_dict(fields: dict, **set_by_loading: object) -> dict:
    """A release config class's `to_dict()` under transformers 4.x: the generic keys at their
    defaults, overridden by the class's own fields, then by what loading and saving set."""
    return {**GENERIC_4X, **fields, **set_by_loading}


# InternLM2 (TroL-1.8B/7B shape, scaled down): GQA with 4 heads over 2 kv heads.
INTERNLM2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=4096, bias=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2, model_type="internlm2")


def internlm2_config_json(vocab: int) -> dict:
    """TroL-1.8B/7B's config.json: the release's InternLM2Config (its own fields, then
    PretrainedConfig's), as saved from TroLForCausalLM in bf16."""
    fields = {**INTERNLM2, "vocab_size": vocab, "hidden_act": "silu", "initializer_range": 0.02, "use_cache": True,
              "tie_word_embeddings": False, "attn_implementation": "flash_attention_2"}
    return legacy_to_dict(fields, architectures=["TroLForCausalLM"], torch_dtype="bfloat16", max_length=4096,
                          _name_or_path="BK-Lee/TroL-7B",
                          auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                                    "AutoModelForCausalLM": "modeling_trol.TroLForCausalLM"})
PLORA_RANK = 8
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=20,
            patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
           patch_size=7, qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
           hidden_act="gelu", initializer_factor=0.1)
# Phi-3-mini-128k's shape of config (longrope past 4,096 positions, a window wider than any
# sequence), scaled down: head_dim 16, so 8 short and 8 long rope factors.
PHI3 = dict(vocab_size=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=131072, original_max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            rope_scaling={"type": "su", "short_factor": [1.0, 1.01, 1.03, 1.07, 1.15, 1.3, 1.6, 2.2],
                          "long_factor": [1.0, 1.3, 2.1, 3.9, 7.5, 14.0, 26.0, 48.0]},
            sliding_window=262144, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="silu",
            initializer_range=0.02, use_cache=True, tie_word_embeddings=False, model_type="phi3")


def phi3_config_json(llm: dict) -> dict:
    """TroL-3.8B's config.json: the release's TroLConfig, whose to_dict() is its whole
    attribute dict (transformers' private ones included) with the LLM's and the vision tower's
    full to_dict() nested."""
    llm_config = legacy_to_dict(llm, architectures=["Phi3ForCausalLM"], torch_dtype="bfloat16",
                                _name_or_path="microsoft/Phi-3-mini-128k-instruct", attn_implementation="flash_attention_2",
                                auto_map={"AutoConfig": "configuration_phi3.Phi3Config",
                                          "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"})
    vit_fields = {**VIT, "num_channels": 3, "use_flash_attn": True, "dropout": 0.0, "drop_path_rate": 0.1,
                  "attention_dropout": 0.0, "initializer_range": 1e-10, "model_type": "intern_vit_6b"}
    vision_config = legacy_to_dict(vit_fields, architectures=["InternVisionModel"], torch_dtype="bfloat16",
                                   _name_or_path="OpenGVLab/InternViT-300M-448px",
                                   auto_map={"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                                             "AutoModel": "modeling_intern_vit.InternVisionModel"})
    fields = {"vision_config": vision_config, "llm_config": llm_config, "use_backbone_lora": 0, "use_llm_lora": 0,
              "pad2square": False, "select_layer": -1, "force_image_size": VIT["image_size"], "downsample_ratio": 0.5,
              "template": "phi3-chat", "dynamic_image_size": True, "use_thumbnail": True, "ps_version": "v2",
              "min_dynamic_patch": 1, "max_dynamic_patch": 6, "model_type": "trol"}
    return legacy_to_dict(fields, architectures=["TroLForCausalLM"], torch_dtype="bfloat16",
                          _name_or_path="BK-Lee/TroL-3.8B", _commit_hash=None, _attn_implementation_internal=None)


def _rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape) * scale


def _save_shards(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _shared_gates(layers: int, hidden: int) -> dict[str, torch.Tensor]:
    weight, bias = _rand(1, hidden, scale=0.5), _rand(1, scale=0.5)
    return {f"{i}.{k}": v for i in range(layers) for k, v in (("weight", weight), ("bias", bias))}


def write_internlm2_release(folder: Path, seed: int = 0) -> Path:
    """A TroL-1.8B/7B-shaped folder: InternLM2 with PLoRA everywhere + CLIP + projector."""
    import sentencepiece as spm

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()), model_prefix=str(folder / "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, user_defined_symbols=["[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"],
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    vocab = 500
    (folder / "tokenizer_config.json").write_text(json.dumps(release_like_config(vocab)))
    cfg = dict(INTERNLM2, vocab_size=vocab)
    (folder / "config.json").write_text(json.dumps(internlm2_config_json(vocab), indent=2))
    d, ff, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // heads
    tensors = {"model.tok_embeddings.weight": _rand(vocab + 1, d, scale=0.5), "model.norm.weight": 1 + _rand(d),
               "output.weight": _rand(vocab, d)}

    def plora(name: str, n_in: int, n_out: int) -> None:
        tensors[f"{name}.ffn.weight"] = _rand(n_out, n_in)
        tensors[f"{name}.lora_A.weight"] = _rand(PLORA_RANK, n_in)
        tensors[f"{name}.lora_B.weight"] = _rand(n_out, PLORA_RANK)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plora(p + "attention.wqkv", d, (heads + 2 * kv) * hd)
        plora(p + "attention.wo", d, d)
        plora(p + "feed_forward.w1", d, ff)
        plora(p + "feed_forward.w3", d, ff)
        plora(p + "feed_forward.w2", ff, d)
        tensors[p + "attention_norm.weight"] = 1 + _rand(d)
        tensors[p + "ffn_norm.weight"] = 1 + _rand(d)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP)).state_dict()
    # Saved by an older transformers whose CLIPVisionModel nested everything under `vision_model.`.
    tensors.update({f"vit.vision_tower.vision_model.{k}": v for k, v in clip.items()})
    tensors["vit.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(26).unsqueeze(0)
    tensors.update({"vision_proj.0.weight": _rand(d, CLIP["hidden_size"]), "vision_proj.0.bias": _rand(d),
                    "vision_proj.2.weight": _rand(d, d), "vision_proj.2.bias": _rand(d)})
    _save_shards(folder, tensors)
    torch.save(_shared_gates(cfg["num_hidden_layers"], d), folder / "trol_gating.pt")
    return folder


def write_phi3_release(folder: Path, seed: int = 0) -> Path:
    """A TroL-3.8B-shaped folder: Phi-3 + InternViT (packed qkv) + LN-MLP projector."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>", "<|system|>"]})
    tokenizer.save_pretrained(folder)
    vocab = len(tokenizer) + 3  # the release pads its vocabulary past the tokenizer's
    llm = dict(PHI3, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    (folder / "config.json").write_text(json.dumps(phi3_config_json(llm), indent=2))
    d, ff, dv = llm["hidden_size"], llm["intermediate_size"], VIT["hidden_size"]
    tensors = {"language_model.model.embed_tokens.weight": _rand(vocab, d, scale=1.0),
               "language_model.model.norm.weight": 1 + _rand(d), "language_model.lm_head.weight": _rand(vocab, d)}
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        tensors.update({p + "self_attn.qkv_proj.weight": _rand(3 * d, d), p + "self_attn.o_proj.weight": _rand(d, d),
                        p + "mlp.gate_up_proj.weight": _rand(2 * ff, d), p + "mlp.down_proj.weight": _rand(d, ff),
                        p + "input_layernorm.weight": 1 + _rand(d), p + "post_attention_layernorm.weight": 1 + _rand(d)})
    grid = VIT["image_size"] // VIT["patch_size"]
    v = "vision_model."
    tensors.update({v + "embeddings.class_embedding": _rand(1, 1, dv), v + "embeddings.position_embedding": _rand(1, grid * grid + 1, dv),
                    v + "embeddings.patch_embedding.weight": _rand(dv, 3, VIT["patch_size"], VIT["patch_size"]),
                    v + "embeddings.patch_embedding.bias": _rand(dv)})
    for i in range(VIT["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        tensors.update({p + "attn.qkv.weight": _rand(3 * dv, dv), p + "attn.qkv.bias": _rand(3 * dv),
                        p + "attn.proj.weight": _rand(dv, dv), p + "attn.proj.bias": _rand(dv),
                        p + "mlp.fc1.weight": _rand(VIT["intermediate_size"], dv), p + "mlp.fc1.bias": _rand(VIT["intermediate_size"]),
                        p + "mlp.fc2.weight": _rand(dv, VIT["intermediate_size"]), p + "mlp.fc2.bias": _rand(dv),
                        p + "norm1.weight": 1 + _rand(dv), p + "norm1.bias": _rand(dv),
                        p + "norm2.weight": 1 + _rand(dv), p + "norm2.bias": _rand(dv),
                        p + "ls1": 0.1 + _rand(dv), p + "ls2": 0.1 + _rand(dv)})
    wide = dv * 4
    tensors.update({"vision_proj.0.weight": 1 + _rand(wide), "vision_proj.0.bias": _rand(wide),
                    "vision_proj.1.weight": _rand(d, wide), "vision_proj.1.bias": _rand(d),
                    "vision_proj.3.weight": _rand(d, d), "vision_proj.3.bias": _rand(d)})
    _save_shards(folder, tensors)
    torch.save(_shared_gates(llm["num_hidden_layers"], d), folder / "trol_gating.pt")
    return folder
