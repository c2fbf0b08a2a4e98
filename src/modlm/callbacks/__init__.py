"""Callbacks the command line adds to every run.

``default_callbacks()`` gives the fixed ones (non-finite loss guard, ThroughputMonitor). The
routing and FLOPs telemetry (``routing_stats``, ``flops_meter``, ``routing_heatmap``: the
``router/*`` and ``flops/*`` tags) are CLI groups of their own (``--routing_stats.*``, ``--flops.*``,
``--routing_heatmap.*``, see ``cli.py``); they read ``pl_module.last_routing`` (the ``RoutingInfo``
list of the latest forward) and ``pl_module.flops_per_batch``.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ThroughputMonitor

from ..lit_module import split_batch
from .nonfinite import NonFiniteLossError, NonFiniteLossGuard


def batch_size(batch: Any) -> int:
    """Sequences in a batch (for ``ThroughputMonitor``)."""
    return split_batch(batch)[0].size(0)


def batch_tokens(batch: Any) -> int:
    """Input tokens in a batch, so ``ThroughputMonitor`` reports tokens per second as ``items``."""
    return split_batch(batch)[0].numel()


def default_callbacks() -> list[pl.Callback]:
    """What every run gets besides ``ModelCheckpoint`` and ``LearningRateMonitor`` (configurable
    CLI groups) and Lightning's default progress bar."""
    return [
        NonFiniteLossGuard(),
        # rates over the last 5 batches: short enough to show up in a smoke run
        ThroughputMonitor(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=5),
    ]


__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "default_callbacks"]
