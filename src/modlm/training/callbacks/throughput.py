"""Tokens and FLOPs per second: Lightning's ``ThroughputMonitor``, counting tokens, switchable.

The monitor synchronizes the device after every training batch to time it, which costs a little
on GPUs; ``--throughput.enabled false`` leaves it out of the run (the CLI drops it from the
trainer's callbacks, so nothing of it runs).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor

from ..batch import batch_size, batch_tokens


class TokenThroughput(ThroughputMonitor):
    def __init__(self, enabled: bool = True, window_size: int = 5):
        """Tokens and FLOPs per second, and MFU where Lightning knows the device's peak.

        Lightning's ``ThroughputMonitor`` with tokens as its items and ``modlm.flops``' FLOPs: rates
        over the last ``window_size`` batches (short enough to show in a smoke run).

        Args:
            enabled: Run the monitor (false: it is left out, and nothing of it runs).
            window_size: Batches the rates are averaged over.
        """
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.enabled = enabled
