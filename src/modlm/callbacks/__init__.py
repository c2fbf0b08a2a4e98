"""Callbacks the command line adds to every run.

``default_callbacks()`` is the one place the CLI asks for them. Routing and FLOPs telemetry
(issue #5: ``router/*`` and ``flops/*`` TensorBoard tags) plugs in by adding its callbacks to
``telemetry_callbacks()``; they can read ``pl_module.last_routing`` (the ``RoutingInfo`` list of the
latest forward) and ``pl_module.flops_per_batch``.
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


def telemetry_callbacks() -> list[pl.Callback]:
    """Routing / FLOPs telemetry callbacks (issue #5). Empty until they land."""
    return []


def default_callbacks() -> list[pl.Callback]:
    """What every run gets besides ``ModelCheckpoint`` and ``LearningRateMonitor`` (configurable
    CLI groups) and Lightning's default progress bar."""
    return [
        NonFiniteLossGuard(),
        # rates over the last 5 batches: short enough to show up in a smoke run
        ThroughputMonitor(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=5),
        *telemetry_callbacks(),
    ]


__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "default_callbacks", "telemetry_callbacks"]
