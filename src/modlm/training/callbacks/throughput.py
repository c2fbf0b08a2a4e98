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
        """``train/device/items_per_sec`` (items = tokens), ``flops_per_sec`` (FLOPs from
        ``modlm.flops``) and MFU where Lightning knows the device, as rates over the last
        ``window_size`` batches (short enough to show in a smoke run). ``enabled=False``: not run."""
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.enabled = enabled
