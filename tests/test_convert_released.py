"""Released TroL checkpoints (tiny, in the released layouts): conversion is strict and the
converted model equals independent references written from the equations."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from released_layouts import CLIP, INTERNLM2, PLORA_RANK, VIT, write_internlm2_release, write_phi3_release
from released_reference import InternLM2Reference, internvit_features
from test_convert_tokenizer import reference_ids
from trol import TroLForConditionalGeneration, TroLProcessor
from trol.convert import ConversionError, convert_released
from trol.convert.internlm2 import RELEASED_SYSTEM


def released_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


def released_and_converted(root: Path, write_release) -> tuple[Path, Path, dict]:
    """(released folder, converted folder, conversion report); small shards so both are sharded."""
    src = write_release(root / "release")
    return src, root / "trol", convert_released(str(src), str(root / "trol"), max_shard_size="64KB")


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    return released_and_converted(tmp_path_factory.mktemp("internlm2"), write_internlm2_release)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return released_and_converted(tmp_path_factory.mktemp("phi3"), write_phi3_release)


def test_every_tensor_is_accounted_for(internlm2, phi3):
    for src, dst, report in (internlm2, phi3):
        source = released_tensors(src)
        gates = torch.load(src / "trol_gating.pt", weights_only=True)
        assert report["source_tensors"] == len(source) + len(gates)
        index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index.values())) > 1, "a sharded source gives a sharded output"
        model = TroLForConditionalGeneration.from_pretrained(dst)
        assert set(index) == set(model.state_dict()) and report["written_tensors"] == len(index)
    # InternLM2: each wqkv becomes q/k/v (base, A, B), the others one each; the CLIP position_ids buffer is dropped.
    assert internlm2[2]["dropped_buffers"] == 1


def test_unknown_or_missing_tensors_fail_naming_them(internlm2, tmp_path):
    src = Path(shutil.copytree(internlm2[0], tmp_path / "extra"))
    save_file({"model.layers.0.attention.surprise.weight": torch.zeros(2)}, str(src / "zz-extra.safetensors"))
    with pytest.raises(ConversionError, match="surprise"):
        convert_released(str(src), str(tmp_path / "out1"))
    src = Path(shutil.copytree(internlm2[0], tmp_path / "missing"))
    (src / "trol_gating.pt").unlink()
    with pytest.raises(ConversionError, match="trol_gating.pt"):
        convert_released(str(src), str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists(), "a failed conversion leaves no folder behind"


def _internlm2_inputs(dst: Path):
    processor = TroLProcessor.from_pretrained(dst)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (20 + 9 * i, 30, 3), dtype=np.uint8)) for i in range(2)]
    text = [processor.build_prompt("Describe the image."), processor.build_prompt("What is it, in a few words?")]
    batch = processor(text=text, images=imgs)
    assert batch["attention_mask"][0].sum() != batch["attention_mask"][1].sum(), "rows must be left-padded"
    return processor, batch


def _reference(src: Path, batch, image_token_id: int):
    W = released_tensors(src)
    gates = torch.load(src / "trol_gating.pt", weights_only=True)
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP))
    clip.load_state_dict({k[len("vit.vision_tower.vision_model."):]: v for k, v in W.items()
                          if k.startswith("vit.vision_tower.") and not k.endswith("position_ids")})
    with torch.no_grad():
        feats = clip(batch["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        feats = torch.nn.functional.gelu(feats @ W["vision_proj.0.weight"].T + W["vision_proj.0.bias"])
        feats = feats @ W["vision_proj.2.weight"].T + W["vision_proj.2.bias"]
    ids = batch["input_ids"]
    embeds = W["model.tok_embeddings.weight"][ids].clone()
    is_image = ids == image_token_id
    embeds[is_image] = feats.reshape(-1, feats.shape[-1])
    ref = InternLM2Reference(W, INTERNLM2, gates, scale=1.0)
    return ref, embeds, is_image.float()


def test_internlm2_logits_and_greedy_ids_equal_the_reference(internlm2):
    src, dst, _ = internlm2
    model = TroLForConditionalGeneration.from_pretrained(dst).eval()
    assert model.config.traversal == "prefill" and len(model.partial_lora_layers()) == 14
    processor, batch = _internlm2_inputs(dst)
    ref, embeds, image_mask = _reference(src, batch, model.config.image_token_id)
    vocab = INTERNLM2.get("vocab_size") or ref.W["output.weight"].shape[0]
    with torch.no_grad():
        ref_logits, ref_ids = ref.greedy(embeds, image_mask, batch["attention_mask"], steps=6)
        # Positions count real tokens only, as generation (and the release) number them under left padding.
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        ours = model(**batch, position_ids=position_ids).logits[..., :vocab]
        out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, batch["input_ids"].shape[1]:], ref_ids)


def test_partial_lora_acts_only_at_image_tokens(internlm2):
    src, dst, _ = internlm2
    model = TroLForConditionalGeneration.from_pretrained(dst).eval()
    config = copy.deepcopy(model.config)
    config.plora = None
    plain = TroLForConditionalGeneration(config).eval()
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".plora_" not in k}
    plain.load_state_dict(state, strict=True)
    processor, batch = _internlm2_inputs(dst)
    text_only = processor(text=[processor.build_prompt("Say hello.", with_image=False)])
    with torch.no_grad():
        assert torch.equal(model(**text_only).logits, plain(**text_only).logits)
        assert not torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-4)
    with pytest.raises(NotImplementedError, match="cannot be folded"):
        model.partial_lora_layers()[0].merge()


def test_internlm2_prompt_tokenizes_as_released(internlm2):
    import sentencepiece as spm

    src, dst, _ = internlm2
    processor = TroLProcessor.from_pretrained(dst)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    question = "<image>\nWhat is the troll doing?"
    released = ("<s>[UNUSED_TOKEN_146]system\n" + RELEASED_SYSTEM + "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\n"
                + question.replace("<image>", "<image>" * 1) + "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")
    released = released.replace("<image>", "<image>" * processor.image_seq_length)
    ours = processor(text=[processor.build_prompt("What is the troll doing?")],
                     images=[Image.new("RGB", (30, 30))])["input_ids"][0].tolist()
    assert ours == reference_ids(sp, config, released)


def test_phi3_vision_and_prompt_match_the_release(phi3):
    src, dst, _ = phi3
    model = TroLForConditionalGeneration.from_pretrained(dst).eval()
    processor = TroLProcessor.from_pretrained(dst)
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 70, 3), dtype=np.uint8))
    batch = processor(text=[processor.build_prompt("Describe.")], images=[wide])
    tiles = batch["pixel_values"].shape[0]
    assert tiles == 3 + 1, "a 70×28 image takes a 3×1 grid plus the thumbnail"
    with torch.no_grad():
        ours = model.vision(batch["pixel_values"])
    reference = internvit_features(released_tensors(src), VIT, batch["pixel_values"], ratio=0.5)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    released = ("<s><|system|>\n" + RELEASED_SYSTEM + "<|end|>\n<|user|>\n<img>"
                + "<IMG_CONTEXT>" * (tiles * processor.image_seq_length) + "</img>\nDescribe.<|end|>\n<|assistant|>\n")
    source_tokenizer = AutoTokenizer.from_pretrained(src)
    assert batch["input_ids"][0].tolist() == source_tokenizer(released, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.parametrize("mode", ["off", "prefill", "full"])
def test_converted_model_runs_in_every_traversal_mode(internlm2, mode):
    _, dst, _ = internlm2
    model = TroLForConditionalGeneration.from_pretrained(dst).eval()
    model.set_traversal(mode)
    _, batch = _internlm2_inputs(dst)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, eos_token_id=None, use_cache=True)
        if mode != "prefill":  # prefill's decode steps are by definition not a recomputation
            again = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, eos_token_id=None, use_cache=False)
            assert torch.equal(cached, again)
    assert PLORA_RANK == model.partial_lora_layers()[0].plora_A.out_features


def test_stage2_lora_trains_on_top_of_partial_lora_and_merges_without_it(internlm2, tmp_path):
    from trol.training import LoraSettings, merge_lora, prepare_for_stage

    _, dst, _ = internlm2
    model = TroLForConditionalGeneration.from_pretrained(dst)
    processor = TroLProcessor.from_pretrained(dst)
    parts = prepare_for_stage(model, "2", LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".plora_" in n for n in trainable), "the released adapters stay frozen by default"
    assert any(".q_proj.base.lora_A" in n for n in trainable), "LoRA sits on the linear inside the partial LoRA"
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    turns = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "a red square"}]
    enc = processor.encode_conversation(turns, has_image=True)
    batch = processor.collate([enc], [processor.prepare_image(image)])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".plora_" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and parts.counts["trainable"] > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if ".plora_" in n)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    assert merge_lora(model) == 14
    assert len(model.partial_lora_layers()) == 14, "merging LoRA never touches the partial LoRA"
    model.save_pretrained(tmp_path / "merged")
    again = TroLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, before, atol=1e-4, rtol=1e-4)
    prepare_for_stage(again, "2", LoraSettings(r=4), train_partial_lora=True)
    assert any(p.requires_grad for n, p in again.named_parameters() if ".plora_" in n)


def test_transformers_pipeline_captions_a_converted_model_with_only_import_trol(internlm2, phi3):
    import subprocess
    import sys

    script = (
        "import sys, trol\n"
        "from PIL import Image\n"
        "from transformers import pipeline\n"
        "for path in sys.argv[1:]:\n"
        "    pipe = pipeline('image-text-to-text', model=path)\n"
        "    chat = [{'role': 'user', 'content': [{'type': 'image', 'image': Image.new('RGB', (60, 30), 'red')},\n"
        "                                        {'type': 'text', 'text': 'Describe the image.'}]}]\n"
        "    out = pipe(text=chat, max_new_tokens=3)\n"
        "    print(type(pipe.model).__name__, type(pipe.processor).__name__, repr(out[0]['generated_text'][-1]['role']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(internlm2[1]), str(phi3[1])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("TroL")]
    assert lines == ["TroLForConditionalGeneration TroLProcessor 'assistant'"] * 2


def test_conversion_memory_stays_near_one_output_shard(tmp_path):
    """320 MB of source tensors through the streaming converter in a fresh process: the peak
    RSS grows by about one output shard (32 MB) and one tensor, not by the model's size."""
    import subprocess
    import sys

    script = r"""
import resource, sys, torch
from pathlib import Path
from trol.convert.checkpoint import ShardWriter, convert_tensors, iter_source_tensors
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
expected = {f"t{s}.{i}": torch.Size([2048, 1024]) for s in range(4) for i in range(10)}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
writer = ShardWriter(dst, max_shard_bytes=32 * 2**20)
counts = convert_tensors(iter_source_tensors(sorted(src.glob("*.safetensors"))), lambda n, t: [(n, t)], expected, writer)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(counts["written_tensors"], (peak - base) // 1024)
"""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    for shard in range(4):  # 4 source files x 10 tensors x 8 MB, written by this process
        save_file({f"t{shard}.{i}": torch.full((2048, 1024), float(i)) for i in range(10)},
                  str(tmp_path / "src" / f"s{shard}.safetensors"))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "dst")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    written, grown_mb = map(int, out.stdout.split())
    assert written == 40 and len(list((tmp_path / "dst").glob("model-*.safetensors"))) == 10
    # Measured ~100 MB (shard buffer, its serialised copy, one tensor, touched mmap pages); holding
    # the model would add 320 MB or more.
    assert grown_mb < 200, f"peak RSS grew by {grown_mb} MB converting 320 MB"


def test_captioner_batches_images_with_different_tile_counts(phi3):
    from trol import Captioner

    _, dst, _ = phi3
    captioner = Captioner(str(dst), dtype="float32", device="cpu")
    rng = np.random.default_rng(5)
    shapes = [(28, 70), (30, 30), (90, 20)]  # 3x1+1, 1 and 1x5+1 tiles
    tiles = [captioner.processor.prepare_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
             for h, w in shapes]
    assert [t.shape[0] for t in tiles] == [4, 1, 6] and all(t.dtype == np.uint8 for t in tiles)
    together = captioner.caption(tiles, "Describe the image.", max_new_tokens=5)
    alone = [captioner.caption([t], "Describe the image.", max_new_tokens=5)[0] for t in tiles]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.num_tokens for r in together] == [r.num_tokens for r in alone]


def test_convert_command_line(internlm2, tmp_path):
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "jobs.cli", "convert", str(internlm2[0]), str(tmp_path / "out"),
                         "--traversal", "full"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert report["family"] == "internlm2" and report["traversal"] == "full"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["traversal"] == "full"
    again = subprocess.run([sys.executable, "-m", "trol.convert", str(internlm2[0]), str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr
