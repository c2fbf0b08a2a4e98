"""What every kind's metrics provide, and the arithmetic they share.

A figure is a ratio of sums, never a mean of per-batch ratios: a pass gives *tallies* (device tensors
keyed by figure, e.g. ``capacity_used.layer_3`` -> [tokens processed, tokens]) that add up over batches
and ranks without a host sync, and ``figures`` turns summed tallies into floats once, at the end. Keys
are the evaluation JSON's (``capacity_used.layer_3``); a TensorBoard tag is the kind's prefix and the key
with dots as slashes (``router/capacity_used/layer_3``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...model.config import ModelConfig


def ratio(numerator, denominator) -> torch.Tensor:
    """A two-entry tally: what is counted, and what it is counted among."""
    return torch.stack([torch.as_tensor(numerator).double(), torch.as_tensor(denominator).double()])


def decision_counts(decision: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[agreements, tokens, true positives, predicted positives, target positives] of a (B, T) bool
    decision against a bool target; counts add up over batches and ranks, ratios would not."""
    counts = [
        (decision == target).sum(),
        torch.tensor(target.numel(), device=target.device),
        (decision & target).sum(),
        decision.sum(),
        target.sum(),
    ]
    return torch.stack(counts).double()  # on the device: no sync until the ratios are needed


def quality_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision and recall (of the selected class) from summed ``decision_counts``."""
    agree, total, true_pos, predicted, actual = counts.tolist()
    return {
        "causal_acc": agree / max(1.0, total),
        "causal_precision": true_pos / max(1.0, predicted),
        "causal_recall": true_pos / max(1.0, actual),
    }


def plain_figures(tallies: dict[str, torch.Tensor]) -> dict[str, float]:
    """Figures of the tallies every kind writes the same way: two-entry ratios, and ``decision.<where>``
    counts as ``causal_acc`` / ``causal_precision`` / ``causal_recall`` at ``<where>``."""
    out = {}
    for key, value in tallies.items():
        name, _, where = key.partition(".")
        if name == "decision":
            out.update({f"{figure}.{where}": v for figure, v in quality_from_counts(value).items()})
        elif value.numel() == 2:
            counted, among = value.tolist()
            out[key] = counted / max(1.0, among)
    return out


class KindMetrics:
    """One kind of mixture's figures. Subclasses set ``prefix`` (its TensorBoard tags start with it) and
    give the methods below; every method takes the infos of that kind from one pass, in depth order (it
    may be empty)."""

    prefix: str = ""

    def tally(self, infos: Sequence, cfg: ModelConfig, input_ids=None, eot_id=None) -> dict[str, torch.Tensor]:
        """This pass's tallies, on the device (``input_ids`` (B, T) and the end-of-text id, when known,
        for figures about which tokens were picked)."""
        return {}

    def figures(self, tallies: dict[str, torch.Tensor]) -> dict[str, float]:
        """Summed tallies as figures (reads the host)."""
        return plain_figures(tallies)

    def histograms(self, infos: Sequence) -> dict[str, torch.Tensor]:
        """Values to draw as histograms, by key (as figures' keys)."""
        return {}

    def selections(self, infos: Sequence) -> list[tuple[str, torch.Tensor]]:
        """``(where, (B, T) bool)``: the tokens each of its routers processed, named as its figures
        (``layer_3``, ``step_1``): for the heat map and the per-task shares of evaluation."""
        return []

    def depth(self, infos: Sequence, cfg: ModelConfig):
        """``(blocks, passed)``: how many of the model's blocks the kind's mixtures span, and per token how
        many of those it passed through ((B, T), or a number)."""
        return 0, 0

    def ran(self, infos: Sequence, cfg: ModelConfig) -> dict:
        """What the pass computed, as ``modlm.analysis.flops.forward_flops`` overrides (reads the host)."""
        return {}
