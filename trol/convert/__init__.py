"""Convert a released TroL checkpoint (TroL-1.8B, TroL-3.8B, TroL-7B) into a TroL folder that
`TroLForConditionalGeneration.from_pretrained` and `TroLProcessor.from_pretrained` load as is.

    python -m trol.convert SRC DST [--traversal prefill|full|off] [--max-shard-size 2GB]
    trol convert SRC DST

SRC is a released folder or hub id (BK-Lee/TroL-7B). Strict: every source tensor lands in
the model (or the conversion fails naming it) and every model tensor gets a value.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig

from ..config import TroLConfig
from ..modeling import TroLForConditionalGeneration
from ..processing import TroLProcessor
from . import internlm2, phi3
from .checkpoint import ConversionError, ShardWriter, convert_tensors, expected_state, iter_source_tensors, source_weight_files
from .config_keys import log_ignored

GATES_FILE = "trol_gating.pt"
FAMILIES = {"internlm2": internlm2, "phi3": phi3}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def resolve_source(src: str) -> Path:
    """A local folder as is; a hub id is downloaded (or found in the local hub cache)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or src.startswith((".", "/", "~")):
        raise ConversionError(f"{src}: not a folder with a released TroL checkpoint")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt", "*.model", "*.txt"]))
    except Exception as exc:
        raise ConversionError(f"could not fetch {src!r} from the hub ({type(exc).__name__}: {exc}); "
                              "download the folder elsewhere and pass its path") from exc


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
        else:
            shapes.update({n: tuple(t.shape) for n, t in torch.load(path, map_location="meta", weights_only=True).items()})
    return shapes


def detect_family(config: dict, names: set[str]) -> str:
    for name, module in FAMILIES.items():
        if module.is_internlm2(config, names) if name == "internlm2" else module.is_phi3(config, names):
            return name
    raise ConversionError("config.json/weights match neither TroL-1.8B/7B (InternLM2) nor TroL-3.8B (Phi-3 + InternViT)")


def _tokenizer(family: str, src: Path):
    if family == "internlm2":
        from .tokenizer import tokenizer_from_sentencepiece

        config_file = src / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        return tokenizer_from_sentencepiece(src / "tokenizer.model", config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    if tokenizer.pad_token is None:  # the release pads with the end-of-text token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def convert_released(src: str, dst: str, *, traversal: str = "prefill", max_shard_size: str | int = "2GB") -> dict:
    """Write the converted folder to `dst` (atomically: a temporary folder renamed at the end)."""
    started = time.time()
    source = resolve_source(src)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{source}: no config.json")
    raw = json.loads(config_file.read_text())
    files = source_weight_files(source)
    shapes = _shapes(files)
    family = detect_family(raw, set(shapes))
    module = FAMILIES[family]
    plan = module.plan(source, raw, shapes)
    log_ignored(plan["ignored_config_keys"])
    tokenizer = _tokenizer(family, source)
    image_token_id = tokenizer.convert_tokens_to_ids(plan["image_token"])
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConversionError(f"the tokenizer has no {plan['image_token']!r} token")
    config = TroLConfig(
        text_config=plan["text_config"], vision_config=plan["vision_config"], image_token_id=image_token_id,
        projector=plan["projector"], vision_feature_layer=plan["vision_feature_layer"],
        pixel_shuffle_ratio=plan["pixel_shuffle_ratio"], traversal=traversal, plora=plan["plora"],
    )
    dtype = next((t for _, t in _first_float(files)), torch.float32)  # kept as released
    config.dtype = dtype
    expected = expected_state(lambda: TroLForConditionalGeneration(config))
    tower_prefix = _tower_prefix(expected)

    out = Path(dst).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty; choose a new folder")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        counts = convert_tensors(_all_tensors(source, files, module, raw, shapes, tower_prefix, config),
                                 _combined_mapper(module, raw, shapes, tower_prefix, config), expected, writer)
        config.save_pretrained(tmp)
        processor = TroLProcessor(
            tokenizer, image_seq_length=plan["image_seq_length"], image=plan["image"], chat=plan["chat"],
            image_token=plan["image_token"], image_placeholder=plan["image_placeholder"],
            image_start=plan["image_start"], image_end=plan["image_end"],
        )
        processor.save_pretrained(tmp)
        generation_config(tokenizer, plan, image_token_id).save_pretrained(tmp)
        report = {"source": src, "family": family, "traversal": traversal, "dtype": str(dtype).replace("torch.", ""),
                  **counts, "bytes": writer.total_bytes, "seconds": round(time.time() - started, 1),
                  "ignored_config_keys": sorted(plan["ignored_config_keys"])}
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def generation_config(tokenizer, plan: dict, image_token_id: int) -> GenerationConfig:
    """Greedy by default; a reply ends at the family's end-of-turn marker or end of text."""
    return GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(plan["end_of_turn"]), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        suppress_tokens=[image_token_id] if plan["suppress_image_token"] else None,
        do_sample=False,
        max_new_tokens=256,
    )


def _first_float(files: list[Path]):
    for name, tensor in iter_source_tensors(files[:1]):
        if tensor.is_floating_point():
            yield name, tensor.dtype
            return


def _tower_prefix(expected: dict) -> str:
    return "vision.tower.vision_model." if any(k.startswith("vision.tower.vision_model.") for k in expected) else "vision.tower."


GATE_PREFIX = "__gates__."


def _all_tensors(source, files, module, raw, shapes, tower_prefix, config):
    yield from iter_source_tensors(files)
    gates = source / GATES_FILE
    if not gates.is_file():
        raise ConversionError(f"{source}: no {GATES_FILE} (the TroL-Mixer gates are released as a separate file)")
    state = torch.load(gates, map_location="cpu", weights_only=True)
    layers = config.text_config.num_hidden_layers
    if set(state) == {"0.weight", "0.bias"} and layers > 1:  # one shared gate saved once: every layer gets it
        state = {f"{i}.{k}": v for i in range(layers) for k, v in (("weight", state["0.weight"]), ("bias", state["0.bias"]))}
    for name, tensor in state.items():
        yield GATE_PREFIX + name, tensor


def gate_mapper(num_layers: int):
    def mapper(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        m = re.match(r"^(\d+)\.(weight|bias)$", name)
        if m is None or int(m.group(1)) >= num_layers:
            raise ConversionError(f"{GATES_FILE}: unexpected tensor {name} (expected 0..{num_layers - 1}.weight/bias)")
        # The release saves one gate under every layer index (shared storage): each mixer gets its own copy.
        return [(f"language_model.model.layers.{m.group(1)}.mixer.gate_linear.{m.group(2)}", t.clone())]

    return mapper


def _combined_mapper(module, raw, shapes, tower_prefix, config):
    tensors = module.tensor_mapper(raw, shapes, tower_prefix)
    gates = gate_mapper(config.text_config.num_hidden_layers)

    def mapper(name, tensor):
        if name.startswith(GATE_PREFIX):
            return gates(name[len(GATE_PREFIX):], tensor)
        return tensors(name, tensor)

    return mapper


__all__ = ["ConversionError", "convert_released", "detect_family", "resolve_source"]
