"""Tiny random checkpoints in the released TroL layouts (same key names and structure, sizes
scaled down), written the way the hub folders are: config.json, sharded safetensors,
trol_gating.pt and tokenizer files made here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from test_convert_tokenizer import release_like_config, training_sentences
from trol.tiny import build_tokenizer

# InternLM2 (TroL-1.8B/7B shape, scaled down): GQA with 4 heads over 2 kv heads.
INTERNLM2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=4096, bias=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2, model_type="internlm2")
PLORA_RANK = 8
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, image_size=20,
            patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
           patch_size=7, qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
           hidden_act="gelu", initializer_factor=0.1)
PHI3 = dict(vocab_size=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096, original_max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, model_type="phi3", auto_map={"AutoConfig": "remote"}, sliding_window=2047)


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
    (folder / "config.json").write_text(json.dumps(cfg))
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
    config = {"model_type": "trol", "llm_config": llm, "vision_config": VIT, "select_layer": -1,
              "downsample_ratio": 0.5, "force_image_size": VIT["image_size"], "min_dynamic_patch": 1,
              "max_dynamic_patch": 6, "template": "phi3-chat"}
    (folder / "config.json").write_text(json.dumps(config))
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
