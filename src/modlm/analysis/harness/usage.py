"""What the model spent on a harness run, per task: the tokens it ran, the share of them each routed
block (or recursion step) processed, and forward FLOPs per token.

Counted row by row from the passes as they ran (padding excluded): a scored pass from its
``RoutingInfo.selected``, a cached generation from the blocks' KV caches (which hold exactly the
tokens each block processed), a top-k generation as one top-k pass over what it fed the model. The
FLOPs of a row are ``forward_flops`` at the row's own length with each routed block at the tokens it
processed (mixture-of-experts MLPs at a balanced router's passes on the tokens they received), so a
figure does not depend on how rows were batched or padded.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...model.config import ModelConfig
from ..evaluate import processed_counts
from ..flops import expert_passes, forward_flops
from ..metrics import selections


@dataclass
class TaskUsage:
    tokens: int = 0
    """Tokens the model ran (contexts and continuations, generated tokens fed back)."""
    processed: dict[str, int] = field(default_factory=dict)
    """Per routed unit (``layer_<i>`` or ``step_<r>``): tokens it processed."""
    flops: float = 0.0
    """Forward FLOPs of every row, summed."""
    request_types: set[str] = field(default_factory=set)
    """The kinds of lm-eval requests the task made (``loglikelihood``, ``generate_until``, ...)."""


def units(config: ModelConfig) -> list[str]:
    """The routed units of a model, each named as its figures are: ``layer_<i>`` per routed block,
    ``step_<r>`` per recursion step a router decides."""
    if config.routes_recursion:
        return [f"step_{r}" for r in range(config.recursions)]
    return [f"layer_{i}" for i in config.routed_layers]


def topk_counts(config: ModelConfig, length: int) -> dict[str, int]:
    """What each routed unit processes in a top-k pass over ``length`` tokens: its k."""
    capacities = config.step_capacities if config.routes_recursion else config.layer_capacities
    return {name: config.topk_tokens(length, c) for name, c in zip(units(config), capacities)}


def pass_counts(config: ModelConfig, out, lengths: list[int]) -> list[dict[str, int]]:
    """Per row of a right-padded batch's ``ModelOutput``: tokens each routed unit processed among the
    row's first ``lengths[row]`` (its real tokens)."""
    picked = dict(selections(out.mixtures))
    if not picked:
        return [{} for _ in lengths]
    first = next(iter(picked.values()))
    real = torch.arange(first.size(1), device=first.device) < torch.tensor(lengths, device=first.device)[:, None]
    counts = torch.stack([(selected & real).sum(dim=1) for selected in picked.values()], dim=1).tolist()  # (B, units)
    return [dict(zip(picked, row)) for row in counts]


def state_counts(model, state) -> tuple[list[int], list[dict[str, int]]]:
    """Per row of a decoding state after generation: tokens the model consumed, and tokens each routed
    unit processed (its cache's length; a recursion step's own count)."""
    columns = processed_counts(model, state)
    seen = state.seen.tolist()
    if not columns:
        return seen, [{} for _ in seen]
    counts = torch.stack([c.to(state.seen.device) for c in columns.values()], dim=1).tolist()
    return seen, [dict(zip(columns, row)) for row in counts]


def row_flops(config: ModelConfig, length: int, counts: dict[str, int], routing: str) -> float:
    """Forward FLOPs of one row of ``length`` tokens whose routed units processed ``counts``."""
    if length == 0:
        return 0.0
    names = units(config)
    per_unit = [counts[name] for name in names] if counts else None
    if config.routes_recursion:
        return float(forward_flops(config, length, tokens_per_recursion_step=per_unit))
    into = dict(zip(config.routed_layers, per_unit or []))
    passes = [expert_passes(config, into.get(layer, length), routing) for layer in config.expert_layers]
    return float(
        forward_flops(config, length, tokens_per_routed_block=per_unit, passes_per_expert_layer=passes or None)
    )


class Usage:
    """The tally of one harness run, per task (``None``: requests that name none)."""

    def __init__(self, config: ModelConfig, routing: str):
        self.config = config
        self.routing = routing
        self.tasks: dict[Optional[str], TaskUsage] = {}

    def add(self, task: Optional[str], request_type: str, length: int, counts: dict[str, int]) -> None:
        """One row: ``length`` tokens run, ``counts`` processed per routed unit."""
        usage = self.tasks.setdefault(task, TaskUsage())
        usage.tokens += length
        for name, n in counts.items():
            usage.processed[name] = usage.processed.get(name, 0) + n
        usage.flops += row_flops(self.config, length, counts, self.routing)
        usage.request_types.add(request_type)

    def figures(self, usage: TaskUsage) -> dict:
        """``tokens``, ``flops_per_token``, ``capacity_used.<unit>`` and their mean ``capacity_used``."""
        out = {"tokens": usage.tokens, "flops_per_token": usage.flops / max(1, usage.tokens)}
        names = units(self.config)
        for name in names:
            out[f"capacity_used.{name}"] = usage.processed.get(name, 0) / max(1, usage.tokens)
        if names:
            out["capacity_used"] = statistics.mean(out[f"capacity_used.{name}"] for name in names)
        return out

    def total(self) -> TaskUsage:
        """Every task's rows together."""
        whole = TaskUsage()
        for usage in self.tasks.values():
            whole.tokens += usage.tokens
            whole.flops += usage.flops
            whole.request_types |= usage.request_types
            for name, n in usage.processed.items():
                whole.processed[name] = whole.processed.get(name, 0) + n
        return whole
