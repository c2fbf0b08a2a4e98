"""A capacity schedule: routed blocks that start processing more of each sequence and end at their
configured capacity.

A model converted from a pretrained dense one computes the pretrained function at capacity 1 (zero
routers, ``router_weight="2sigmoid"``); lowering the capacity at once would cut most tokens out of
half the blocks before the routers know which ones matter. ``CapacitySchedule`` lowers it over
``steps`` optimizer steps instead, linearly or along a half cosine, from ``start`` to each routed
block's own target (``ModelConfig.layer_capacities``: one capacity, one per block, or a spread with
depth), and holds the targets after.

Like the learning-rate schedule, its plan is part of every checkpoint (``state_dict``), and a
resumed run follows the plan it started with. Each step the module sets every routed block's
``capacity`` (so ``k``, what top-k routing processes) from it, and charges the step's FLOPs at those
``k`` (``StepReport.routed_tokens``): ``flops/step`` follows the schedule.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from ..model.errors import UserError

CAPACITY_KEY = "capacity_schedule"
"""Checkpoint key of the schedule's plan."""


class CapacitySchedule:
    """Capacity of each routed block at optimizer step ``step`` (0-based): ``start`` at step 0, each
    block's target from step ``steps`` on, ``shape`` between (``linear``, or ``cosine``: a half
    cosine, slow at both ends)."""

    def __init__(
        self, start: float, steps: int, targets: Sequence[float], shape: Literal["linear", "cosine"] = "cosine"
    ):
        targets = [float(t) for t in targets]
        if not targets:
            raise UserError("a capacity schedule needs routed blocks (route_every > 0 or route_layers)")
        if not isinstance(start, (int, float)) or not 0 < start <= 1:
            raise UserError(f"capacity_start={start!r} is invalid: must be in (0, 1]")
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"capacity_steps={steps!r} is invalid: a schedule needs at least 1 step")
        if shape not in ("linear", "cosine"):
            raise UserError(f"capacity_shape={shape!r} is invalid: must be 'linear' or 'cosine'")
        above = [t for t in targets if t > start + 1e-12]
        if above:
            raise UserError(
                f"the capacity schedule ends above its start: capacity_start={start:g} is below the target "
                f"capacity {max(above):g} (a schedule only lowers the capacity)"
            )
        self.start, self.steps, self.targets, self.shape = float(start), steps, targets, shape

    def progress(self, step: int) -> float:
        """0 at the start, 1 from ``steps`` on."""
        t = min(1.0, max(0, step) / self.steps)
        return t if self.shape == "linear" else 0.5 * (1 - math.cos(math.pi * t))

    def __call__(self, step: int) -> list[float]:
        p = self.progress(step)
        return [self.start + (target - self.start) * p for target in self.targets]

    def state_dict(self) -> dict:
        return {"start": self.start, "steps": self.steps, "targets": list(self.targets), "shape": self.shape}

    @classmethod
    def from_state(cls, state: dict) -> "CapacitySchedule":
        return cls(state["start"], state["steps"], state["targets"], state["shape"])
