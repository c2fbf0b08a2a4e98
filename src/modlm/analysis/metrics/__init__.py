"""What the mixtures did, as numbers: the one place where each kind of mixture meets its figures.

A forward pass reports a ``MixtureInfo`` per mixture (``ModelOutput.mixtures``). Each kind has its
metrics in a file of its own (``routed.py``, ``experts.py``, ``recursion.py``, on ``base.KindMetrics``),
named once in ``KINDS`` below; everything else here works on any list of mixtures, so training telemetry
(``callbacks/routing_stats.py``), evaluation (``evaluate.py``) and the FLOPs of a pass as it ran handle
every kind without naming one, and a figure means the same thing in TensorBoard and in ``eval.py``'s JSON.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...model.config import ModelConfig
from ...model.mixture import MixtureInfo
from ...model.moe import ExpertInfo
from ...model.recursion import RecursionInfo
from ...model.routing import RoutingInfo
from ..flops import forward_flops
from .base import KindMetrics, decision_counts, quality_from_counts
from .experts import ExpertMetrics, dropped_fraction, expert_load, noop_fraction, passes_per_row
from .recursion import RecursionMetrics, depth_shares
from .routed import RoutedMetrics, causal_decision, router_decision_counts

KINDS: dict[type, KindMetrics] = {
    RoutingInfo: RoutedMetrics(),
    ExpertInfo: ExpertMetrics(),
    RecursionInfo: RecursionMetrics(),
}
"""Each kind of mixture's info -> its metrics. Adding a mixture adds its entry here."""

Tallies = dict[str, dict[str, torch.Tensor]]
"""Per kind (its prefix), tallies by key: device tensors that add up over batches and ranks."""

__all__ = [
    "KINDS",
    "Tallies",
    "add_tallies",
    "aux_losses",
    "causal_decision",
    "decision_counts",
    "depth_shares",
    "dropped_fraction",
    "expert_load",
    "figures",
    "histograms",
    "noop_fraction",
    "passes_per_row",
    "quality_from_counts",
    "ran_forward_flops",
    "router_decision_counts",
    "selections",
    "tally",
    "token_depth",
]


def by_kind(mixtures: Sequence[MixtureInfo]) -> list[tuple[KindMetrics, list]]:
    """Every kind's metrics with its infos from ``mixtures`` (in depth order; empty for a kind the pass
    did not report)."""
    return [(metrics, [m for m in mixtures if type(m) is kind]) for kind, metrics in KINDS.items()]


def tally(
    mixtures: Sequence[MixtureInfo],
    cfg: ModelConfig,
    input_ids: Optional[torch.Tensor] = None,
    eot_id: Optional[int] = None,
) -> Tallies:
    """One pass's tallies, per kind (no host sync)."""
    out = {}
    for metrics, infos in by_kind(mixtures):
        found = metrics.tally(infos, cfg, input_ids, eot_id)
        if found:
            out[metrics.prefix] = found
    return out


def add_tallies(total: Tallies, more: Tallies) -> Tallies:
    """``total`` with ``more`` added in (in place)."""
    for prefix, tallies in more.items():
        into = total.setdefault(prefix, {})
        for key, value in tallies.items():
            into[key] = value if key not in into else into[key] + value
    return total


def figures(tallies: Tallies) -> dict[str, dict[str, float]]:
    """Summed tallies as figures, per kind prefix (reads the host)."""
    kinds = {metrics.prefix: metrics for metrics in KINDS.values()}
    return {prefix: kinds[prefix].figures(found) for prefix, found in tallies.items()}


def histograms(mixtures: Sequence[MixtureInfo]) -> dict[str, dict[str, torch.Tensor]]:
    """Values to draw as histograms, per kind prefix, by key."""
    out = {}
    for metrics, infos in by_kind(mixtures):
        found = metrics.histograms(infos)
        if found:
            out[metrics.prefix] = found
    return out


def selections(mixtures: Sequence[MixtureInfo]) -> list[tuple[str, torch.Tensor]]:
    """``(where, (B, T) bool)``: the tokens each router processed, in depth order, named as its figures."""
    return [row for metrics, infos in by_kind(mixtures) for row in metrics.selections(infos)]


def token_depth(mixtures: Sequence[MixtureInfo], cfg: ModelConfig):
    """(B, T) blocks each token went through: every block no mixture spans, plus those of the mixtures it
    passed (a number, ``n_layers``, for a model without routed depth)."""
    spanned, passed = 0, 0
    for metrics, infos in by_kind(mixtures):
        blocks, through = metrics.depth(infos, cfg)
        spanned, passed = spanned + blocks, passed + through
    return cfg.n_layers - spanned + passed


def aux_losses(mixtures: Sequence[MixtureInfo]) -> dict[str, torch.Tensor]:
    """Each unweighted auxiliary loss, averaged over the mixtures that report it (on the device)."""
    found: dict[str, list[torch.Tensor]] = {}
    for mixture in mixtures:
        for name, value in mixture.aux_losses.items():
            found.setdefault(name, []).append(value)
    return {name: torch.stack(values).mean() for name, values in found.items()}


def ran_forward_flops(cfg: ModelConfig, seq_len: int, mixtures: Sequence[MixtureInfo]) -> float:
    """Forward FLOPs per sequence of a pass as it ran: each mixture at what it computed (its kind's
    ``ran``: a routed block or recursion step at the tokens its padded batch held, a mixture of experts at
    the expert passes it computed per row). Reads the counts on the host."""
    overrides = {}
    for metrics, infos in by_kind(mixtures):
        overrides.update(metrics.ran(infos, cfg))
    return forward_flops(cfg, seq_len, **overrides)
