"""The epoch plan: a pure function of (seed, epoch, world) that deals every row exactly once."""

import numpy as np
import pytest

from pipelines.finetune.plan import EMPTY_SLOT, RowIndex, epoch_order, eval_plan, worker_plan

INDEX = RowIndex(("a", "b"), ((40, 40, 17), (50,)))  # 147 rows in four row groups


def plans(world: int, epoch: int, seed: int = 0, batch_size: int = 4, grad_accum: int = 3):
    return [worker_plan(INDEX, seed=seed, epoch=epoch, rank=r, world=world, batch_size=batch_size,
                        grad_accum=grad_accum, shuffle_window=16) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_and_whole_steps_for_every_worker(world):
    per_worker = plans(world, epoch=0)
    rows = np.concatenate([p.reshape(-1) for p in per_worker])
    assert sorted(rows[rows != EMPTY_SLOT].tolist()) == list(range(INDEX.num_rows))
    assert len({p.shape for p in per_worker}) == 1, "same number of micro-batches everywhere"
    assert per_worker[0].shape[0] % 3 == 0, "a whole number of steps"


def test_the_order_depends_on_seed_and_epoch_only():
    assert all(np.array_equal(a, b) for a, b in zip(plans(2, epoch=1), plans(2, epoch=1)))
    assert not np.array_equal(plans(2, epoch=0)[0], plans(2, epoch=1)[0])
    assert not np.array_equal(plans(2, epoch=0, seed=1)[0], plans(2, epoch=0)[0])


def test_row_groups_stay_together_within_a_window():
    order = epoch_order(INDEX, seed=3, epoch=0, shuffle_window=16)
    _, groups_of, _ = INDEX.locate(order[:16])
    shards, _, _ = INDEX.locate(order[:16])
    assert len(set(zip(shards.tolist(), groups_of.tolist()))) <= 2, "a window spans at most two row groups"
    assert sorted(order.tolist()) == list(range(INDEX.num_rows))


def test_locate_maps_global_ids_to_group_rows():
    shards, groups, offsets = INDEX.locate(np.array([0, 39, 40, 96, 97, 146]))
    assert shards.tolist() == [0, 0, 0, 0, 1, 1]
    assert groups.tolist() == [0, 0, 1, 2, 0, 0]
    assert offsets.tolist() == [0, 39, 0, 16, 0, 49]


def test_eval_plan_is_capped_and_in_order():
    plan = eval_plan(INDEX, rank=1, world=2, batch_size=4, max_batches=3)
    assert plan.shape == (3, 4) and plan.reshape(-1).tolist() == list(range(1, 24, 2))
