"""Advantages and dynamic sampling, pinned with hand-computed numbers."""

import pytest
import torch

from loraforge.rl.advantage import fill_batch, group_advantages, keep_group, kept_groups


def test_group_advantages_hand_computed():
    rewards = torch.tensor(
        [
            1.0,
            -1.0,
            -1.0,
            1.0,  # group 0
            1.0,
            1.0,
            1.0,
            1.0,  # group 1: all equal
            0.5,  # group 2: a group of one
            1.0,
            0.0,
            0.0,
        ]
    )  # group 3
    groups = [0] * 4 + [1] * 4 + [2] + [3] * 3
    a = group_advantages(rewards, groups)
    # group 0: mean 0, unbiased std sqrt((1+1+1+1)/3) = 1.1547005 -> A = +-1/(1.1547005 + 1e-6) = +-0.8660247
    assert a[:4].tolist() == pytest.approx([0.8660247, -0.8660247, -0.8660247, 0.8660247], abs=1e-6)
    # group 1: (1 - 1) / (0 + 1e-6) = 0
    assert a[4:8].tolist() == [0.0] * 4
    # group 2: mean 0, std 1 -> 0.5 / (1 + 1e-6) = 0.4999995
    assert a[8].item() == pytest.approx(0.4999995, abs=1e-7)
    # group 3: mean 1/3; unbiased std sqrt(((2/3)^2 + (1/3)^2 + (1/3)^2) / 2) = sqrt(1/3) = 0.5773503
    # A = (2/3) / 0.5773513 = 1.1546985, (-1/3) / 0.5773513 = -0.5773493
    assert a[9:].tolist() == pytest.approx([1.1546985, -0.5773493, -0.5773493], abs=1e-6)


def test_advantage_groups_need_not_be_contiguous():
    a = group_advantages(torch.tensor([1.0, 5.0, 0.0, 5.0]), [0, 1, 0, 1])
    # group 0 = [1, 0]: mean 0.5, unbiased std sqrt(0.25 + 0.25) = 0.7071068 -> +-0.5 / 0.7071078 = +-0.7071058
    assert a[[0, 2]].tolist() == pytest.approx([0.7071058, -0.7071058], abs=1e-6)
    assert a[[1, 3]].tolist() == [0.0, 0.0]


def test_keep_group():
    assert keep_group([1.0, 0.0]) is True  # population std 0.5 > 0
    assert keep_group([1.0, 1.0, 1.0]) is False  # all right: std 0
    assert keep_group([0.0, 0.0]) is False  # all wrong: std 0
    assert keep_group([1.0]) is True  # a group of one is kept (verl: no std to speak of)
    assert kept_groups([1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2]) == [2]


def test_fill_batch_dynamic_sampling():
    batches = iter(
        [
            [[1, 1], [0, 1], [0, 0]],  # 1 kept
            [[1, 0], [1, 1], [0, 0]],  # 1 kept -> 2
            [[0, 1], [1, 0], [1, 1]],  # 2 kept -> 4, cut to 3
        ]
    )
    kept, seen, n = fill_batch(lambda: next(batches), target=3, max_gen_batches=0, dynamic=True)
    assert kept == [[0, 1], [1, 0], [0, 1]]  # in order, truncated to the target
    assert len(seen) == 9 and n == 3  # the reward before filtering is logged over all 9 groups


def test_fill_batch_without_dynamic_sampling_takes_first_batch():
    kept, seen, n = fill_batch(lambda: [[1, 1], [0, 0]], target=2, max_gen_batches=1, dynamic=False)
    assert kept == [[1, 1], [0, 0]] and n == 1


def test_fill_batch_gives_up_after_max_gen_batches():
    with pytest.raises(RuntimeError, match="kept 0 of the 2 groups needed after 3 generation batches"):
        fill_batch(lambda: [[1, 1], [0, 0]], target=2, max_gen_batches=3, dynamic=True)
