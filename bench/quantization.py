"""What `quantize: 4|8` buys and costs on CPU: the weights' memory in fp32, 8-bit and 4-bit
(everything the state dict holds: weights, buffers, quantization constants), how much of the
fp32 model the quantized layers were, and how far the logits move from fp32's.

    python -m bench.quantization [--size tiny|small]

All three load the same saved model through `trol.load_model` on CPU, computing in fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from trol import load_model
from trol.quantization import quantized_modules, weight_bytes

from .common import note, parse_args, print_machine, ratio, result
from .models import SHAPES, save_model


def _quantized_share(model: torch.nn.Module, names: list[str]) -> int:
    """Bytes the layers bitsandbytes replaces hold in the fp32 model."""
    modules = dict(model.named_modules())
    return sum(p.numel() * p.element_size() for n in names for p in modules[n].parameters())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv=argv)
    print_machine("cpu", "float32", size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(args.size, Path(tmp) / args.size)
        reference, processor = load_model(str(folder), dtype="float32", device="cpu")
        image = torch.zeros(3, SHAPES[args.size].image_size, SHAPES[args.size].image_size, dtype=torch.uint8)
        batch = processor(text=[processor.build_prompt("Describe the image.")], images=[image])
        with torch.no_grad():
            expected = reference(**batch).logits
        fp32 = weight_bytes(reference)
        result("weights_mb_fp32", fp32 / 2**20, "MiB")
        for bits, label in ((8, "int8"), (4, "nf4")):
            model, _ = load_model(str(folder), dtype="float32", device="cpu", quantize=bits)
            names = quantized_modules(model)
            if bits == 8:
                share = _quantized_share(reference, names)
                note(f"{len(names)} linear layers quantized (the decoder's projections): {share / 2**20:.2f} MiB of "
                     f"the fp32 model; embeddings, LM head, vision side and mixers stay fp32")
                result("quantized_share_of_fp32", ratio(share, fp32), "fraction")
            size = weight_bytes(model)
            result(f"weights_mb_{label}", size / 2**20, "MiB")
            result(f"weights_ratio_{label}_over_fp32", ratio(size, fp32), "x")
            with torch.no_grad():
                diff = (model(**batch).logits - expected).abs()
            result(f"logit_max_diff_{label}", float(diff.max()), "abs")
            result(f"logit_mean_diff_{label}", float(diff.mean()), "abs")
        result("logit_max_abs_fp32", float(expected.abs().max()), "abs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
