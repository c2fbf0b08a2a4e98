"""Optimizer pieces: AdamW parameter groups and the warmup + cosine learning-rate schedule.

The schedule is a callable *object*, not a closure, on purpose: ``LambdaLR.state_dict()`` saves
the ``__dict__`` of callable objects, so a checkpoint carries the schedule's plan (warmup, total
steps, floor) and a resumed run follows the plan it started with, wherever it was interrupted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model.errors import UserError


class WarmupCosine:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps, then a cosine
    decay from 1 to ``min_ratio`` that ends exactly at ``total_steps`` and stays there after.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        if warmup_steps < 0:
            raise UserError(f"warmup_steps={warmup_steps} is invalid: must be >= 0")
        if total_steps <= 0:
            raise UserError(f"the LR schedule needs a positive number of steps, got {total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise UserError(f"min_lr_ratio={min_ratio} is invalid: must be in [0, 1]")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (linear weights, embeddings, routers) decay; vectors (norm gains,
    biases) do not, since shrinking a gain or bias toward 0 is not a useful prior.

    ``named_parameters`` yields a tied weight once, so the shared embedding / LM head matrix is
    optimised once. Works on FSDP2 DTensors too: ``dim()`` is the global (unsharded) rank.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
