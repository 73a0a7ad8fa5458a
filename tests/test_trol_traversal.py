"""Traversal semantics: off == backbone, full cached == recomputed, prefill == released TroL."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from trol import TroLCache, TroLDecoderLayer, TroLMixer
from trol_helpers import BACKBONES, mixed_batch, tiny


def plain_backbone(model):
    """The unwrapped backbone with the same weights (wrapper keys `.layer.` removed, mixers dropped)."""
    plain = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    state = {k.replace(".layer.", "."): v for k, v in model.language_model.state_dict().items() if ".mixer." not in k}
    plain.load_state_dict(state, strict=True)
    return plain


@pytest.mark.parametrize("backbone", BACKBONES)
def test_off_mode_gives_the_backbones_logits(backbone):
    model, processor = tiny(backbone, traversal="off")
    text, imgs = mixed_batch(processor)
    batch = processor(text=text, images=imgs)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        ours = model(**batch).logits
        theirs = plain_backbone(model)(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        model.set_traversal("full")
        traversed = model(**batch).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(traversed, theirs, atol=1e-3), "full traversal must change the output"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_full_mode_cached_generation_equals_recomputation(backbone):
    model, processor = tiny(backbone, traversal="full")
    text, imgs = mixed_batch(processor)
    batch = processor(text=text, images=imgs)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3, "prompt lengths must differ"
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  eos_token_id=None, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        recomputed = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_full in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(step_cached, step_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_prefill_mode_matches_full_prefill_and_plain_decode_steps(backbone):
    model, processor = tiny(backbone, traversal="full")
    text, imgs = mixed_batch(processor)
    batch = processor(text=text, images=imgs)
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(**batch, position_ids=position_ids, use_cache=True)
        model.set_traversal("prefill")
        prefill = model(**batch, position_ids=position_ids, use_cache=True)
        assert torch.equal(prefill.logits, full.logits)
        # The released behaviour never stores the second pass's K/V.
        assert prefill.cache.traversal.get_seq_length() == 0
        assert full.cache.traversal.get_seq_length() == mask.shape[1]

        cache = prefill.cache
        for _ in range(3):
            next_ids = prefill.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            step = dict(input_ids=next_ids, attention_mask=mask, position_ids=position_ids[:, -1:] + 1)
            reference_cache = copy.deepcopy(cache)
            prefill = model(**step, cache=cache)
            model.set_traversal("off")  # one plain pass over the cached first-pass K/V
            plain = model(**step, cache=reference_cache)
            model.set_traversal("prefill")
            assert torch.equal(prefill.logits, plain.logits)
            position_ids = step["position_ids"]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("traversal", ["full", "prefill"])
def test_mixed_batch_generates_what_each_row_generates_alone(backbone, traversal):
    model, processor = tiny(backbone, traversal=traversal)
    text, imgs = mixed_batch(processor)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        batch = processor(text=text, images=imgs)
        together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
        for row, (t, im) in enumerate(zip(text, imgs)):
            single = processor(text=[t], images=[im])
            alone = model.generate(**single, **kwargs)[0, single["input_ids"].shape[1]:]
            assert together[row, : len(alone)].tolist() == alone.tolist()
            # a row that stopped early is padded after its EOS
            assert all(t == processor.tokenizer.pad_token_id for t in together[row, len(alone):].tolist())


def test_gate_and_mix_follow_the_equations():
    torch.manual_seed(0)
    d = 16
    mixer = TroLMixer(d)
    torch.nn.init.normal_(mixer.gate_linear.weight)
    torch.nn.init.normal_(mixer.gate_linear.bias)
    h1, h2 = torch.randn(2, 5, d), torch.randn(2, 5, d)
    w, b = mixer.gate_linear.weight[0], mixer.gate_linear.bias[0]
    s = 0.5 * torch.tanh(h1 @ w + b) + 0.5
    torch.testing.assert_close(mixer.gate(h1)[..., 0], s)
    torch.testing.assert_close(mixer(h1, h2), (1 - s)[..., None] * h1 + s[..., None] * h2)
    assert sum(p.numel() for p in mixer.parameters()) == d + 1
    assert 0.05 < s.std() and ((s > 0) & (s < 1)).all(), "one gate value per token, in (0, 1)"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_wrapped_layer_is_two_passes_of_the_same_layer_then_mix(backbone):
    model, _ = tiny(backbone, traversal="full")
    decoder = model.language_model.get_decoder()
    wrapped = decoder.layers[0]
    assert isinstance(wrapped, TroLDecoderLayer)
    x = torch.randn(2, 6, model.config.text_config.hidden_size)
    position_ids = torch.arange(6)[None].expand(2, 6)
    rope = decoder.rotary_emb(x, position_ids=position_ids)
    kwargs = dict(position_embeddings=rope, position_ids=position_ids, attention_mask=None)
    with torch.no_grad():
        h1 = wrapped.layer(x, **kwargs)
        h2 = wrapped.layer(h1, **kwargs)
        s = 0.5 * torch.tanh(h1 @ wrapped.mixer.gate_linear.weight[0] + wrapped.mixer.gate_linear.bias[0]) + 0.5
        expected = (1 - s)[..., None] * h1 + s[..., None] * h2
        torch.testing.assert_close(wrapped(x, **kwargs), expected)
        cache = TroLCache(config=model.config.text_config)
        torch.testing.assert_close(wrapped(x, cache=cache, **kwargs), expected)
        assert cache.get_seq_length(0) == cache.traversal.get_seq_length(0) == 6


@pytest.mark.parametrize("backbone", BACKBONES)
def test_prefill_mode_chunk_after_a_cache_attends_to_cached_first_pass_and_stores_nothing(backbone):
    model, _ = tiny(backbone, traversal="prefill")
    decoder = model.language_model.get_decoder()
    wrapped = decoder.layers[1]
    d = model.config.text_config.hidden_size
    past, chunk = torch.randn(1, 5, d), torch.randn(1, 3, d)
    with torch.no_grad():
        cache = TroLCache(config=model.config.text_config)
        pos = torch.arange(5)[None]
        wrapped(past, cache=cache, position_ids=pos, position_embeddings=decoder.rotary_emb(past, position_ids=pos),
                attention_mask=None)
        assert cache.get_seq_length(1) == 5 and cache.traversal.get_seq_length(1) == 0
        pos = torch.arange(5, 8)[None]
        kwargs = dict(position_ids=pos, position_embeddings=decoder.rotary_emb(chunk, position_ids=pos),
                      attention_mask=torch.ones(1, 1, 3, 8, dtype=torch.bool).tril(5))
        before = copy.deepcopy(cache)
        out = wrapped(chunk, cache=cache, **kwargs)
        # reference: first pass on a copy, second pass on a throwaway copy of the earlier cache
        h1 = wrapped.layer(chunk, cache=copy.deepcopy(before), **kwargs)
        h2 = wrapped.layer(h1, cache=copy.deepcopy(before), **kwargs)
        torch.testing.assert_close(out, wrapped.mixer(h1, h2))
        assert cache.get_seq_length(1) == 8, "the first pass is cached"
        assert cache.traversal.get_seq_length(1) == 0, "the second pass is not"


def test_full_mode_beam_search_reorders_both_caches():
    model, processor = tiny("llama", traversal="full")
    text, imgs = mixed_batch(processor)
    batch = processor(text=text, images=imgs)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, num_beams=4, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        recomputed = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("traversal", ["full", "prefill"])
def test_sliding_window_layers_with_assisted_decoding(traversal):
    """Prompt-lookup decoding crops the caches and extends them several tokens at a time."""
    from trol import TroLForConditionalGeneration

    _, processor = tiny("qwen2", traversal=traversal)
    config = copy.deepcopy(_.config)
    text = config.text_config
    text.use_sliding_window, text.sliding_window = True, 4
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    torch.manual_seed(0)
    model = TroLForConditionalGeneration(config).eval()
    batch = processor(text=[processor.build_prompt("a a b a a b a a b", with_image=False)])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        assisted = model.generate(**batch, prompt_lookup_num_tokens=3, **kwargs)
        plain = model.generate(**batch, **kwargs)
        recomputed = model.generate(**batch, use_cache=False, **kwargs)
    assert assisted.shape == plain.shape == recomputed.shape
    if traversal == "full":  # "prefill" traverses multi-token verification passes: outputs may differ
        assert torch.equal(assisted, plain) and torch.equal(plain, recomputed)
