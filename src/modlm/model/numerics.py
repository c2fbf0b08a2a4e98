"""What a model step may assume about where it runs, shared by the routers of the model.

* ``full_precision``: routers rank and weigh tokens in fp32, even under bf16 autocast (a bf16
  score has 8 bits of mantissa: near-ties would be broken by rounding).
* ``host_can_branch``: whether a step may read its routing decisions on the host to skip work.
"""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))
"""Device types with an autocast mode; looked up once here, because ``torch.amp.is_autocast_available``
inside ``forward`` is opaque to ``torch.compile`` and broke the graph at every routed block."""


def full_precision(device_type: str):
    """Context that turns autocast off (a no-op where it is off), so router scores are ranked in
    fp32; devices without autocast (the meta device ``measure_flops`` uses) get a null context."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def host_can_branch(x: torch.Tensor) -> bool:
    """Whether a decoding step may look at its routing decisions on the host to skip work.

    On the CPU the decisions are already in host memory, so reading them costs nothing and a row
    (or an expert) with nothing to do does no work at all. On an accelerator it would stall the
    stream once per router per token, and under ``torch.compile`` it would split the graph: there
    every row does the work and the updates that should not exist are multiplied by 0 (static
    shapes, no sync).
    """
    return x.device.type == "cpu" and not torch.compiler.is_compiling()
