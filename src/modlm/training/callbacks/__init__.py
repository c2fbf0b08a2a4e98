"""Callbacks of a training run; ``modlm.cli.train`` decides which ones every run gets.

``nonfinite`` stops on a NaN/inf loss before it reaches a checkpoint; ``checkpointing`` is the run's
``ModelCheckpoint``; ``preemption`` saves on every rank at the next step boundary after a signal;
the routing and FLOPs telemetry (``routing_stats``, ``flops_meter``, ``routing_heatmap``: the
``router/*`` and ``flops/*`` tags, named in ``modlm.training.tags``) read each step's ``StepReport``
(``modlm.training.telemetry``); their maths is ``modlm.analysis``'. ``dashboard`` lays the tags out
in TensorBoard; ``throughput`` is Lightning's ``ThroughputMonitor`` counting tokens; ``harness``
scores lm-evaluation-harness tasks every N steps when asked (``--harness.tasks``).
"""

from .nonfinite import NonFiniteLossError, NonFiniteLossGuard

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard"]
