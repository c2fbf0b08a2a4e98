"""Callbacks of a training run; ``modlm.cli`` decides which ones every run gets.

``nonfinite`` stops on a NaN/inf loss before it reaches a checkpoint; the routing and FLOPs
telemetry (``routing_stats``, ``flops_meter``, ``routing_heatmap``: the ``router/*`` and
``flops/*`` tags) read ``pl_module.last_routing`` (the ``RoutingInfo`` list of the latest forward)
and ``pl_module.flops_per_batch``; their maths is ``modlm.metrics`` and ``modlm.flops``.
"""
from .nonfinite import NonFiniteLossError, NonFiniteLossGuard

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard"]
