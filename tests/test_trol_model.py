"""Model plumbing: parameter counts, save/load, gradients, checkpointing, vision variants."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, CLIPVisionConfig

from trol import TroLConfig, TroLForConditionalGeneration, TroLProcessor
from trol_helpers import BACKBONES, PROMPT, images, mixed_batch, tiny


@pytest.mark.parametrize(
    "layers, hidden, expected",
    [(24, 2048, 49_176), (32, 3072, 98_336), (32, 4096, 131_104)],  # TroL-1.8B, 3.8B, 7B
)
def test_mixer_parameter_count_of_the_released_shapes(layers, hidden, expected):
    text = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=256, vocab_size=128)
    config = TroLConfig(text_config=text, vision_config=CLIPVisionConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=28, patch_size=14))
    with torch.device("meta"):  # shapes only: no memory for a 7B-wide model
        model = TroLForConditionalGeneration(config)
    mixer_params = sum(p.numel() for n, p in model.named_parameters() if "mixer" in n)
    assert mixer_params == expected == layers * (hidden + 1)
    assert len(model.mixers()) == layers


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_load_round_trip_is_bit_exact_in_every_mode(backbone, tmp_path):
    model, processor = tiny(backbone, traversal="full")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any("mixer" in k for k in saved)
    reference = model.state_dict()
    for mode in ["full", "prefill", "off"]:
        loaded = TroLForConditionalGeneration.from_pretrained(tmp_path, traversal=mode)
        assert loaded.config.traversal == mode
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    text, imgs = mixed_batch(processor)
    loaded.set_traversal("full")
    reloaded_processor = TroLProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        a = model(**processor(text=text, images=imgs)).logits
        b = loaded(**reloaded_processor(text=text, images=imgs)).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_reach_mixers_and_projector_and_checkpointing_changes_nothing(backbone):
    model, processor = tiny(backbone, traversal="full")
    model.train()
    turns = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "a handwritten digit seven"}]
    enc = processor.encode_conversation(turns, has_image=True)
    pixels = [processor.preprocess_image(images(1)[0])]
    batch = processor.collate([enc, enc], pixels * 2)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    for mixer_grad in [g for n, g in grads.items() if "mixer" in n]:
        assert mixer_grad.abs().sum() > 0
    assert sum(1 for n in grads if "mixer" in n) == 2 * model.config.text_config.num_hidden_layers
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("vision.projector"))
    assert any(n.startswith("vision.tower") for n in grads)

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.language_model.get_decoder().layers[0].layer.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, loss, atol=0, rtol=0)
    assert ckpt_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5)


def test_loss_counts_only_unmasked_tokens():
    model, processor = tiny("llama")
    turns = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "a cat"}]
    enc = processor.encode_conversation(turns, has_image=True)
    batch = processor.collate([enc], [processor.preprocess_image(images(1)[0])])
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != -100
        expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "vision, projector, ratio, tokens",
    [("clip", "mlp2x_gelu", None, 16), ("siglip", "ln_mlp2x_gelu", None, 16), ("siglip", "ln_mlp2x_gelu", 0.5, 4),
     ("clip", "mlp2x_gelu", 0.5, 4)],
)
def test_vision_variants(vision, projector, ratio, tokens):
    model, processor = tiny("qwen2", vision=vision, projector=projector, pixel_shuffle_ratio=ratio)
    assert model.config.image_seq_length == processor.image_seq_length == tokens
    if projector == "ln_mlp2x_gelu":
        assert isinstance(model.vision.projector.norm, torch.nn.LayerNorm)
    text, imgs = mixed_batch(processor)
    batch = processor(text=text, images=imgs)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 2 * tokens
    with torch.no_grad():
        features = model.vision(batch["pixel_values"])
        logits = model(**batch).logits
    assert features.shape == (2, tokens, model.config.text_config.hidden_size)
    assert torch.isfinite(logits).all()


def test_image_count_mismatch_is_a_clear_error():
    model, processor = tiny("llama")
    batch = processor(text=[processor.build_prompt(PROMPT)], images=images(1))
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="placeholders"):
        processor(text=[processor.build_prompt(PROMPT)], images=[])


@pytest.mark.parametrize("backbone, traversal", [("llama", "full"), ("qwen2", "prefill"), ("phi3", "off")])
def test_tiny_cli_writes_a_loadable_model(backbone, traversal, tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "trol.tiny", str(out), "--backbone", backbone, "--traversal", traversal],
                   check=True, capture_output=True)
    model = TroLForConditionalGeneration.from_pretrained(out)
    processor = TroLProcessor.from_pretrained(out)
    assert model.config.traversal == traversal
    assert model.config.text_config.model_type == backbone
    batch = processor(text=[processor.build_prompt(PROMPT)], images=images(1))
    generated = model.generate(**batch, max_new_tokens=3, do_sample=True, top_p=0.9, temperature=0.7)
    assert generated.shape[1] > batch["input_ids"].shape[1]


def test_cosine_schedule_warms_up_decays_and_stays_at_zero():
    from trol.training import cosine_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_with_warmup(optimizer, warmup_steps=4, total_steps=20)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:5] == sorted(rates[:5]) and rates[4] == 1.0
    assert all(a >= b for a, b in zip(rates[4:20], rates[5:21]))
    assert rates[20:] == [0.0] * 10
