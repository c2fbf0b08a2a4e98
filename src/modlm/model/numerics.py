"""Where the model computes in fp32 whatever the autocast dtype: the routers' regions.

Routers and causal predictors rank and threshold tokens. A bf16 score has 8 bits of mantissa, so
near-ties would be broken by rounding and a predictor logit near 0 would flip its decision, so
both run in fp32 even under bf16 autocast (a few multiply-adds per token against the block's
thousands), and with fp32 copies of their weights when the model itself is bf16.
"""

from __future__ import annotations

import contextlib

import torch

_AUTOCAST_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d)
)
"""Device types with an autocast mode; looked up once here, because ``torch.amp.is_autocast_available``
inside ``forward`` is opaque to ``torch.compile`` and broke the graph at every routed block."""


def full_precision(device_type: str):
    """Context that turns autocast off (a no-op where it is off), so router scores are computed in
    fp32; devices without autocast (the meta device ``measure_flops`` uses) get a null context."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
