"""bitsandbytes 4-bit (NF4) and 8-bit (LLM.int8) weights for the LLM's linear layers, on CUDA
and on CPU (bitsandbytes' PyPI wheel carries CPU kernels).

What stays in full precision: `SKIP_MODULES`, matched the way transformers 5 matches
`llm_int8_skip_modules` (a pattern matches a module's full name from its start up to a dot,
or as its suffix): the whole vision side (`vision.`: tower and projector), every TroL-Mixer
gate (`….mixer.gate_linear`), the partial-LoRA adapters of TroL-1.8B/7B (`….plora_A/B`; the
linear they wrap is quantized) and the LM head. Embeddings are never quantized (bitsandbytes
replaces linear layers only). What is quantized: the decoder layers' attention and MLP
projections. README "Released models" compares this with the official loader's list.

Compute dtype: the dtype the model runs in (`float32` on CPU unless asked otherwise), so the
quantized layers compute like the full-precision ones around them and differ from the
unquantized model only by the weights' rounding.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

SKIP_MODULES = ["vision", "gate_linear", "plora_A", "plora_B", "lm_head"]
BITS = (4, 8)


def require_bitsandbytes(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantize={bits}: choose 4, 8 or null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize: {bits} needs bitsandbytes (pip install bitsandbytes; the dev and gpu extras "
                         "install it), or set quantize: null")


def bnb_config(bits: int, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for `bits`; 4-bit stores NF4 with double-quantized scales."""
    require_bitsandbytes(bits)
    from transformers import BitsAndBytesConfig

    _quiet_int8_cast_notice()
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


def load_kwargs(bits: int | None, dtype: torch.dtype, device: torch.device) -> dict:
    """Extra `from_pretrained` arguments that load the LLM's linear layers quantized on `device`
    (bitsandbytes places the weights itself); {} for bits None."""
    if not bits:
        return {}
    where = (device.index or 0) if device.type == "cuda" else device.type
    return {"quantization_config": bnb_config(bits, dtype), "device_map": {"": where}}


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules holding bitsandbytes weights."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def set_cpu_repacking(model: nn.Module, allowed: bool) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel the first
    time it runs in eval mode without gradients. That kernel has no backward, so a model that
    trains (and evaluates between steps) keeps the one layout autograd goes through
    (allowed=False); and bitsandbytes 0.50 cannot repack a layer whose input width is not a
    multiple of its 64-value block (it fails on the first call), so such layers never repack."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            fits = module.in_features % module.weight.blocksize == 0
            module.support_avx512bf16_for_cpu = bool(allowed and fits and module.support_avx512bf16_for_cpu)


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{state-dict key of each quantized weight: its dequantized value on CPU, in the dtype the
    layer computes in}: what the quantized model multiplies by, as ordinary tensors."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):
            state = weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError(f"{name}: weight repacked for CPU inference; call set_cpu_repacking(model, False) first")
            value = bnbf.dequantize_4bit(weight.data, state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # int8 rows times their absmax / 127 (LLM.int8's row-wise scales)
            value = weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127.0)
        else:
            continue
        out[f"{name}.weight"] = value.detach().cpu()
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything the model's state dict holds: weights, buffers and bitsandbytes'
    quantization constants (block scales, code books), each storage counted once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    """LLM.int8 quantizes activations from fp16, and bitsandbytes logs that cast on every matmul
    of every layer at every decoding step; the cast is the method, not a problem to report."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())
