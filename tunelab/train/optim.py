"""AdamW and the learning-rate schedule: linear warmup over max(1, ratio x steps), then cosine to min_lr.

The schedule is a pure function of the step, so resuming needs no scheduler state, and a run of any length
(three steps on a tiny dataset included) reaches the peak lr and never trains at lr 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.config.schema import TrainSettings


def warmup_steps(total_steps: int, ratio: float) -> int:
    return max(1, round(ratio * total_steps))


def lr_at(step: int, total_steps: int, train: TrainSettings) -> float:
    """Learning rate of update number `step` (0-based)."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warm = warmup_steps(total_steps, train.warmup_ratio)
    if step < warm:
        return peak * (step + 1) / warm
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: Any, train: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def keep_gradients(params: list[torch.nn.Parameter]) -> None:
    """Give every trainable parameter its gradient tensor once, so that each backward adds into it. Runs with CUDA
    graphs need this: a gradient that backward hands over whole (the step's first micro-batch's, when `.grad` is
    None) lives in the graph's own memory, which the next micro-batch's replay overwrites (pytorch#169545)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def zero_gradients(optimizer: torch.optim.Optimizer, keep: bool) -> None:
    """After a step: free the gradients, or (`keep`, see keep_gradients) zero them where they are."""
    optimizer.zero_grad(set_to_none=not keep)
