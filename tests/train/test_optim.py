"""The schedule: warmup of max(1, ratio x steps), cosine after it, never lr 0 on a tiny run; gradients kept
allocated between steps for CUDA graphs."""

import itertools
import math

import pytest
import torch

from tunelab.config.schema import TrainSettings
from tunelab.train.optim import keep_gradients, lr_at, warmup_steps, zero_gradients


def test_warmup_then_cosine():
    t = TrainSettings(lr=1.0, warmup_ratio=0.1)
    lrs = [lr_at(s, 100, t) for s in range(100)]
    assert warmup_steps(100, 0.1) == 10
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # cosine decays monotonically
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] > 0


@pytest.mark.parametrize("total", [1, 2, 3, 5])
def test_tiny_runs_reach_the_peak_and_never_train_at_zero(total):
    # The anchor's defect: on a small dataset the warmup (in iterations) outlasted the run and lr stayed ~0.
    t = TrainSettings(lr=2e-4, warmup_ratio=0.03)
    lrs = [lr_at(s, total, t) for s in range(total)]
    assert max(lrs) == pytest.approx(2e-4)
    assert min(lrs) > 2e-4 * 0.05


def test_min_lr_ratio_is_the_floor():
    t = TrainSettings(lr=1.0, warmup_ratio=0.0, min_lr_ratio=0.1)
    assert lr_at(10_000, 10_000, t) == pytest.approx(0.1)
    assert min(lr_at(s, 50, t) for s in range(50)) >= 0.1


def test_kept_gradients_are_added_into_and_zeroed_in_place():
    """CUDA graphs need each backward to add into a gradient tensor that outlives it (optim.keep_gradients)."""
    layer = torch.nn.Linear(4, 3)
    params = list(layer.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    keep_gradients(params)
    held = [p.grad for p in params]
    assert all(torch.count_nonzero(g) == 0 for g in held)
    x = torch.randn(5, 4)
    for _ in range(2):
        layer(x).sum().backward()
    assert all(p.grad is g for p, g in zip(params, held))  # added into, never replaced
    assert torch.allclose(layer.bias.grad, torch.full((3,), 10.0))  # 5 rows x 2 backward passes
    opt.step()
    zero_gradients(opt, keep=True)
    assert all(p.grad is g and torch.count_nonzero(g) == 0 for p, g in zip(params, held))
    zero_gradients(opt, keep=False)
    assert all(p.grad is None for p in params)
