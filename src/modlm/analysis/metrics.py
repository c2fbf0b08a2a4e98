"""What the routers did, as numbers: plain functions of ``RoutingInfo`` and ``ExpertInfo`` tensors.

Shared by training telemetry (``callbacks/routing_stats.py``) and evaluation (``evaluate.py``), so
a figure means the same thing in TensorBoard and in ``eval.py``'s table. No framework code: each
function takes the routing of one forward pass (one ``RoutingInfo`` per routed block) and returns
tensors or floats.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model.moe import ExpertInfo
from ..model.routing import RoutingInfo, causal_logits


def capacity_used(info: RoutingInfo) -> torch.Tensor:
    """Fraction of the batch's tokens the block processed (top-k: exactly k/T), a 0-dim tensor on
    the routing's device (no sync until the caller asks for the value)."""
    return info.selected.float().mean()


def causal_decision(info: RoutingInfo) -> torch.Tensor:
    """The per-token decision causal routing makes: the predictor's if there is one, else the router's."""
    return causal_logits(info.router_logits, info.predictor_logits) > 0


def decision_counts(info: RoutingInfo) -> torch.Tensor:
    """[agreements, tokens, true positives, predicted positives, top-k positives] of the causal
    decision against top-k membership; counts add up over batches and ranks, ratios would not."""
    decision, target = causal_decision(info), info.topk
    counts = [(decision == target).sum(), torch.tensor(target.numel(), device=target.device),
              (decision & target).sum(), decision.sum(), target.sum()]
    return torch.stack(counts).double()  # on the device: no sync until the ratios are needed


def quality_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Accuracy, precision and recall (of the selected class) from summed ``decision_counts``."""
    agree, total, true_pos, predicted, actual = counts.tolist()
    return {
        "causal_acc": agree / max(1.0, total),
        "causal_precision": true_pos / max(1.0, predicted),
        "causal_recall": true_pos / max(1.0, actual),
    }


def decision_quality(info: RoutingInfo) -> dict[str, float]:
    """Accuracy, precision and recall of one pass's causal decision against top-k membership."""
    return quality_from_counts(decision_counts(info))


def token_depth(infos: Sequence[RoutingInfo], n_layers: int) -> torch.Tensor:
    """(B, T) number of blocks each token went through: every dense block plus the routed ones that picked it."""
    n_dense = n_layers - len(infos)
    picked = torch.stack([info.selected for info in infos]).sum(dim=0) if infos else 0
    return n_dense + picked


def overlap_counts(info: RoutingInfo, after: RoutingInfo) -> torch.Tensor:
    """[tokens picked by this block and by the next routed block ``after``, tokens picked by this
    block]: counts on the device, to add up over batches before the ratio."""
    return torch.stack([(info.selected & after.selected).sum(), info.selected.sum()])


def selection_scalars(infos: Sequence[RoutingInfo], input_ids: torch.Tensor, eot_id: Optional[int]) -> dict[str, float]:
    """Per-block capacity, overlap with the next routed block, and trivial-token picks for one
    batch, keyed ``"<name>/layer_<i>"``."""
    stats = {}
    for n, info in enumerate(infos):
        sel = info.selected
        layer = f"layer_{info.layer}"
        stats[f"capacity_used/{layer}"] = capacity_used(info).item()
        stats[f"selected_first/{layer}"] = sel[:, 0].float().mean().item()
        if eot_id is not None:
            stats[f"selected_eot/{layer}"] = (sel & (input_ids == eot_id)).sum().item() / max(1, sel.sum().item())
        if n + 1 < len(infos):
            both, mine = overlap_counts(info, infos[n + 1]).tolist()
            stats[f"overlap/{layer}"] = both / max(1, mine)
    return stats


# --- mixture-of-experts routers ---------------------------------------------------------------------
def _real_picks(info: ExpertInfo) -> torch.Tensor:
    """(B, n, k) bool: the picks of real tokens (padding's picks are not routing decisions)."""
    picks = torch.ones_like(info.computed)
    return picks if info.valid is None else picks & info.valid.unsqueeze(-1)


def expert_load(info: ExpertInfo) -> torch.Tensor:
    """(n_choices,) share of the picks that went to each expert, real ones first, then the no-op
    ones (before capacity: what the router asked for); sums to 1."""
    mask = _real_picks(info)
    counts = torch.bincount(info.expert[mask].flatten(), minlength=info.n_choices).double()
    return counts / counts.sum().clamp(min=1)


def noop_fraction(info: ExpertInfo) -> torch.Tensor:
    """Share of the picks that chose a no-op expert: MLP work skipped (integrated MoDE)."""
    return expert_load(info)[info.n_experts:].sum()


def dropped_fraction(info: ExpertInfo) -> torch.Tensor:
    """Share of the picks of real experts that their expert did not compute (over its capacity)."""
    wanted = _real_picks(info) & (info.expert < info.n_experts)
    return (wanted & ~info.computed).sum().double() / wanted.sum().clamp(min=1)


def passes_per_row(info: ExpertInfo) -> torch.Tensor:
    """Expert MLP passes computed per sequence, on average over the batch's rows (what
    ``modlm.flops.expert_passes`` counts, measured)."""
    return info.computed.sum() / info.computed.size(0)


def expert_scalars(infos: Sequence[ExpertInfo]) -> dict[str, float]:
    """Per mixture-of-experts MLP ``i``: ``load/layer_i/expert_e`` for each real expert,
    ``noop_fraction/layer_i``, ``dropped/layer_i`` and ``load_balance/layer_i`` (unweighted)."""
    stats = {}
    for info in infos:
        layer = f"layer_{info.layer}"
        load = expert_load(info).tolist()
        for e in range(info.n_experts):
            stats[f"load/{layer}/expert_{e}"] = load[e]
        if info.n_choices > info.n_experts:
            stats[f"noop_fraction/{layer}"] = sum(load[info.n_experts:])
        stats[f"dropped/{layer}"] = dropped_fraction(info).item()
        if info.load_balance is not None:
            stats[f"load_balance/{layer}"] = info.load_balance.item()
    return stats
