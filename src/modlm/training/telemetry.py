"""What a step hands its callbacks: the declared interface between the module and the telemetry.

``MoDLightningModule.training_step`` and ``validation_step`` return their ``StepReport`` under
``"report"``, and Lightning passes it on as the ``outputs`` of ``on_train_batch_end`` /
``on_validation_batch_end``: the routing callbacks, the FLOPs meter and the heat map read it there
(``report_of``), never attributes of the module. (``flops_per_batch`` stays a module attribute: it
is what Lightning's ``ThroughputMonitor`` reads.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from ..model.mixture import MixtureInfo


@dataclass
class StepReport:
    mixtures: list[MixtureInfo] = field(default_factory=list)
    """What every mixture did in the step's top-k pass, in depth order (``ModelOutput.mixtures``; empty
    for dense models)."""
    causal_mixtures: list[MixtureInfo] = field(default_factory=list)
    """Validation only: what they did in the causal-routing pass."""
    flops: float = 0.0
    """FLOPs of the step's batch on this device: forward and backward in training, the forward
    passes run in validation (the causal pass at the tokens it processed)."""
    routed_tokens: list[int] = field(default_factory=list)
    """``k`` of each routed block in the step's top-k pass, in depth order (a capacity schedule
    changes it from step to step; empty for dense models)."""


def report_of(outputs) -> Optional[StepReport]:
    """The ``StepReport`` in a batch-end hook's ``outputs``, if the step returned one."""
    found = outputs.get("report") if isinstance(outputs, Mapping) else None
    return found if isinstance(found, StepReport) else None
