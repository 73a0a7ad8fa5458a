"""The step's loss is weighted by token: accumulating micro-batches equals one big batch."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.finetune.parallel import TokenLossModule, freeze_unreachable_vision
from pipelines.finetune.step import train_step
from trol.training import prepare_for_stage
from trol_helpers import images, tiny

REPLIES = ["a", "two words", "a rather longer reply with many more tokens in it than the others",
           "three short words", "x", "one more reply of middling length", "ok", "the last reply here"]


def rows(processor):
    """Eight rows: replies of very different lengths, every other one with an image."""
    pictures = images(len(REPLIES))
    out = []
    for i, reply in enumerate(REPLIES):
        has_image = i % 2 == 0
        enc = processor.encode_conversation([{"role": "user", "content": f"Question {i}?"},
                                             {"role": "assistant", "content": reply}], has_image=has_image)
        out.append((enc, processor.prepare_image(pictures[i]) if has_image else None))
    return out


def step(module, processor, batches) -> tuple[float, dict[str, torch.Tensor]]:
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)  # the update is the gradient itself
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    result = train_step(module, batches, optimizer, scheduler, params, max_grad_norm=1e9,
                        normalize=processor.normalize, autocast=torch.autocast("cpu", enabled=False))
    grads = {n: before[n] - p.detach() for n, p in module.named_parameters() if p.requires_grad}
    return float(result.loss_sum / result.label_tokens), grads


@pytest.mark.parametrize("stage", ["1", "full"])
def test_grad_accum_4_by_2_equals_one_batch_of_8(stage):
    model, processor = tiny("llama")
    prepare_for_stage(model, stage)
    freeze_unreachable_vision(model, processor.image_size)
    model.train()  # the tiny model has no dropout: train mode is deterministic
    data = rows(processor)
    label_counts = [sum(t != -100 for t in enc["labels"][1:]) for enc, _ in data]
    assert max(label_counts) > 4 * min(label_counts), "micro-batches must differ in answer tokens"

    def collate(part):
        return processor.collate([e for e, _ in part], [p for _, p in part])

    module = TokenLossModule(model, processor.image_size)
    one_loss, one_grads = step(copy.deepcopy(module), processor, [collate(data)])
    # Micro-batches 2 and 4 hold only text rows here (rows 1, 3 / 5, 7 have no image): the
    # vision path still runs, with zero weight.
    order = [0, 2, 1, 3, 4, 6, 5, 7]
    micro = [collate([data[i] for i in order[k:k + 2]]) for k in range(0, 8, 2)]
    assert "pixel_values" not in micro[1] and "pixel_values" not in micro[3]
    accum_loss, accum_grads = step(copy.deepcopy(module), processor, micro)

    assert accum_loss == pytest.approx(one_loss, abs=1e-5)
    assert one_grads.keys() == accum_grads.keys() and len(one_grads) > 0
    for name in one_grads:
        torch.testing.assert_close(accum_grads[name], one_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # A mean of per-micro-batch means (the old weighting) would differ: the check has teeth.
    means = []
    for batch in micro:
        with torch.no_grad():
            loss = module(**{k: (processor.normalize(v) if k == "pixel_values" else v) for k, v in batch.items()})
        means.append(float(loss) / float((batch["labels"][:, 1:] != -100).sum()))
    assert abs(sum(means) / len(means) - one_loss) > 1e-3
