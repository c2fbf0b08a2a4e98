"""Mixture-of-Recursions figures (``RecursionInfo``), per recursion step ``step_r``:

  capacity_used     share of the sequence the step processed (top-k: its k/T)
  causal_acc        its causal decision against its top-k, among the tokens it chose from (those the step
                    before processed; also causal_precision, causal_recall); none under token choice,
                    whose depths are decided up front with no top-k to grade them against

and over the tokens: ``depth_mean`` (recursion steps taken), ``depth_share.depth_d`` (the share that took
exactly d steps), and a histogram of the steps taken (``depth``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...model.config import ModelConfig
from ...model.recursion import RecursionInfo
from .base import KindMetrics, plain_figures
from .routed import router_tallies


def depth_shares(info: RecursionInfo) -> list[float]:
    """The share of tokens that took exactly d recursion steps, for d = 0 .. the number of steps."""
    counts = torch.bincount(info.depth.flatten(), minlength=len(info.steps) + 1).double()
    return (counts / counts.sum()).tolist()


class RecursionMetrics(KindMetrics):
    prefix = "recursion"

    def tally(
        self, infos: Sequence[RecursionInfo], cfg: ModelConfig, input_ids=None, eot_id=None
    ) -> dict[str, torch.Tensor]:
        out = {}
        for info in infos:
            for step in info.steps:
                out.update(router_tallies(step, f"step_{step.layer}", cfg.random_routing))
            out["depth"] = torch.bincount(info.depth.flatten(), minlength=len(info.steps) + 1).double()
        return out

    def figures(self, tallies: dict[str, torch.Tensor]) -> dict[str, float]:
        out = plain_figures({key: value for key, value in tallies.items() if key != "depth"})
        if "depth" in tallies:
            counts = tallies["depth"]
            total = max(1.0, float(counts.sum()))
            shares = (counts / total).tolist()
            out.update({f"depth_share.depth_{d}": share for d, share in enumerate(shares)})
            out["depth_mean"] = sum(d * share for d, share in enumerate(shares))
        return out

    def histograms(self, infos: Sequence[RecursionInfo]) -> dict[str, torch.Tensor]:
        return {"depth": info.depth.flatten() for info in infos}

    def selections(self, infos: Sequence[RecursionInfo]) -> list[tuple[str, torch.Tensor]]:
        return [(f"step_{step.layer}", step.selected) for info in infos for step in info.steps]

    def depth(self, infos: Sequence[RecursionInfo], cfg: ModelConfig):
        if not infos:
            return 0, 0
        return cfg.stack_layers * cfg.recursions, cfg.stack_layers * infos[0].depth

    def ran(self, infos: Sequence[RecursionInfo], cfg: ModelConfig) -> dict:
        """Each step at the tokens its padded batch held."""
        if not infos:
            return {}
        return {"tokens_per_recursion_step": [int(step.selected.sum(dim=1).max()) for step in infos[0].steps]}
