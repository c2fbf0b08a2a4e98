"""What a batch is: the forms a training or validation batch may take, and how big it is.

The data module yields (B, T+1) windows of token ids; other data (tuples, dicts) works too. The
training step splits a batch with ``split_batch``; ``ThroughputMonitor`` counts it with
``batch_size`` and ``batch_tokens``.
"""
from __future__ import annotations

from typing import Any

import torch


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets from a batch.

    Accepts a (B, T+1) window tensor (inputs are the first T tokens, targets the last T), an
    ``(inputs, targets)`` pair, or a dict with ``input_ids``/``targets`` (or ``labels``).
    """
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:]
    if isinstance(batch, dict):
        targets = batch.get("targets", batch.get("labels"))
        if targets is None:
            return split_batch(batch["input_ids"])
        return batch["input_ids"], targets
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"unsupported batch type {type(batch).__name__}: expected a (B, T+1) tensor or (inputs, targets)")


def batch_size(batch: Any) -> int:
    """Sequences in a batch (for ``ThroughputMonitor``)."""
    return split_batch(batch)[0].size(0)


def batch_tokens(batch: Any) -> int:
    """Input tokens in a batch, so ``ThroughputMonitor`` reports tokens per second as ``items``."""
    return split_batch(batch)[0].numel()
