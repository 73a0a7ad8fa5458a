"""Captioner: the small interface the Ray predictor uses (load once, caption batches)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from .modeling import TroLForConditionalGeneration
from .processing import TroLProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on GPUs that support it, fp16 on older GPUs, float32 on CPU (CPU bf16
    matmuls are slow)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 where flash-attn is installed and usable, SDPA otherwise."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def inference_quantization(bits: int | None):
    """bitsandbytes 4- or 8-bit weights for the LLM's linear layers (CUDA only). The vision
    tower, projector, TroL gates, partial-LoRA adapters and LM head stay unquantised, as in
    the released models."""
    if not bits:
        return None
    if bits not in (4, 8):
        raise ValueError(f"quantize={bits}: choose 4, 8 or null")
    if not torch.cuda.is_available():
        raise ValueError(f"quantize: {bits} needs a CUDA GPU (bitsandbytes); set quantize: null on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["vision", "gate_linear", "plora_A", "plora_B", "lm_head"],
    )


def load_model(
    name_or_path: str,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    quantize: int | None = None,
) -> tuple[TroLForConditionalGeneration, TroLProcessor]:
    """Model on its device in eval mode, and its processor."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = attn_implementation or default_attn_implementation(dev, torch_dtype)
    quantization = inference_quantization(quantize)
    extra = {"quantization_config": quantization, "device_map": {"": dev.index or 0}} if quantization else {}
    model = TroLForConditionalGeneration.from_pretrained(
        name_or_path, dtype=torch_dtype, attn_implementation=attn, **extra
    )
    adapter = os.path.join(str(name_or_path), "adapter")
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):  # fine-tuned with keep_adapter
        from .training import apply_saved_adapter

        apply_saved_adapter(model, adapter)
    if not quantization:  # bitsandbytes placed the weights already
        model = model.to(dev)
    return model.eval(), TroLProcessor.from_pretrained(name_or_path)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Shares memory where it may; copies a read-only view (torch tensors must be writable)."""
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@dataclass
class CaptionResult:
    text: str
    num_tokens: int  # generated tokens, the end-of-turn token included


class Captioner:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str | None = None,
        model_id: str | None = None,
        quantize: int | None = None,
    ):
        self.model, self.processor = load_model(model, dtype=dtype, device=device, quantize=quantize)
        self.device = self.model.device
        self.model_id = model_id or str(model)

    @torch.inference_mode()
    def caption(
        self,
        pixel_values: list[np.ndarray],
        prompt: str | list[str],
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[CaptionResult]:
        """One caption per image. `prompt` is the user message: one for the whole batch, or
        one per image (rows with different prompts share the batch; left padding aligns them)."""
        if not len(pixel_values):
            return []
        prompts = [prompt] * len(pixel_values) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(pixel_values):
            raise ValueError(f"{len(prompts)} prompts for {len(pixel_values)} images: give one prompt, or one per image")
        # Each distinct prompt is built once; the processor then tokenises each distinct text once.
        built = {p: self.processor.build_prompt(p) for p in dict.fromkeys(prompts)}
        text = [built[p] for p in prompts]
        # uint8 tiles travel to the device as they are and are normalised there.
        images = [_tensor(p).to(self.device, non_blocking=True) for p in pixel_values]
        batch = self.processor(text=text, images=images).to(self.device)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
        new_tokens = out[:, batch["input_ids"].shape[1] :].cpu()
        return [self._result(row) for row in new_tokens]

    def _result(self, row: torch.Tensor) -> CaptionResult:
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        tokens = row.tolist()
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        text = self.processor.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
        return CaptionResult(text=text, num_tokens=end)
