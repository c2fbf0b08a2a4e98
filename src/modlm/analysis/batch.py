"""What a batch is: the forms a training or validation batch may take, how it splits into inputs and targets,
and how big it is.

The data module yields (B, T+1) windows of token ids, or for chat data dicts of ``input_ids`` and ``targets``
whose ``IGNORE_INDEX`` targets carry no loss; other data (pairs, dicts with ``labels``) works too. The
training step and the evaluation split a batch with ``split_batch``; ``ThroughputMonitor`` counts it with
``batch_size`` and ``batch_tokens``; ``loss_targets`` counts what the loss is the mean of.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.config import IGNORE_INDEX


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets from a batch.

    Accepts a (B, T+1) window tensor (inputs are the first T tokens, targets the last T), an
    ``(inputs, targets)`` pair, or a dict with ``input_ids``/``targets`` (or ``labels``); targets equal to
    ``IGNORE_INDEX`` carry no loss.
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


def loss_targets(targets: torch.Tensor) -> torch.Tensor:
    """How many targets carry the loss (a 0-d tensor: no host sync): those that are not ``IGNORE_INDEX``."""
    return (targets != IGNORE_INDEX).sum()


def batch_size(batch: Any) -> int:
    """Sequences in a batch (for ``ThroughputMonitor``)."""
    return split_batch(batch)[0].size(0)


def batch_tokens(batch: Any) -> int:
    """Input tokens in a batch, so ``ThroughputMonitor`` reports tokens per second as ``items`` (a chat
    window's padding included: the model computes on it)."""
    return split_batch(batch)[0].numel()
