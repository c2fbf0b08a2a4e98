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
from ..model.recursion import RecursionInfo
from ..model.routing import RoutingInfo, causal_logits


def capacity_used(info: RoutingInfo) -> torch.Tensor:
    """Fraction of the batch's tokens the block processed (top-k: exactly k/T), a 0-dim tensor on
    the routing's device (no sync until the caller asks for the value)."""
    return info.selected.float().mean()


def causal_decision(info: RoutingInfo) -> torch.Tensor:
    """The per-token causal decision: in a causal pass, the one it made (whatever
    ``ModelConfig.causal_decision`` is); in a top-k pass (training), the one the BCE trains, the
    sign of the predictor's logit (or the router's without a predictor)."""
    if info.causal:
        return info.selected
    return causal_logits(info.router_logits, info.predictor_logits) > 0


def decision_counts(info: RoutingInfo, among: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[agreements, tokens, true positives, predicted positives, top-k positives] of the causal
    decision against top-k membership; counts add up over batches and ranks, ratios would not.
    ``among`` (B, T) bool: count only those tokens (a recursion step's eligible ones)."""
    decision, target = causal_decision(info), info.topk
    if among is not None:
        decision, target = decision[among], target[among]
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


def selection_figures(infos: Sequence[RoutingInfo], input_ids: torch.Tensor, eot_id: Optional[int]) -> dict[str, dict[int, float]]:
    """For one batch, ``{figure: {layer: value}}`` over the routed blocks: ``capacity_used``,
    ``selected_first`` (share of rows whose first position is picked), ``selected_eot`` (share of
    picks that are the end-of-text token; with ``eot_id``) and ``overlap`` (share of the block's
    picks the next routed block picks too; every block but the last)."""
    figures: dict[str, dict[int, float]] = {"capacity_used": {}, "selected_first": {}}
    if eot_id is not None:
        figures["selected_eot"] = {}
    if len(infos) > 1:
        figures["overlap"] = {}
    for n, info in enumerate(infos):
        sel = info.selected
        figures["capacity_used"][info.layer] = capacity_used(info).item()
        figures["selected_first"][info.layer] = sel[:, 0].float().mean().item()
        if eot_id is not None:
            figures["selected_eot"][info.layer] = (sel & (input_ids == eot_id)).sum().item() / max(1, sel.sum().item())
        if n + 1 < len(infos):
            both, mine = overlap_counts(info, infos[n + 1]).tolist()
            figures["overlap"][info.layer] = both / max(1, mine)
    return figures


# --- recursion steps (Mixture-of-Recursions) ----------------------------------------------------------
def step_eligible(info: RecursionInfo, step: int) -> Optional[torch.Tensor]:
    """(B, T) bool: the tokens recursion step ``step`` chose among (those the step before
    processed); None for the first step (every token)."""
    return info.steps[step - 1].selected if step else None


def recursion_decision_counts(info: RecursionInfo) -> dict[int, torch.Tensor]:
    """``decision_counts`` of each step, among the tokens it chose from (none under token choice:
    its depths are decided up front, with no top-k to grade them against)."""
    return {step.layer: decision_counts(step, step_eligible(info, n)) for n, step in enumerate(info.steps)
            if step.topk is not None}


def depth_shares(info: RecursionInfo) -> list[float]:
    """The share of tokens that took exactly d recursion steps, for d = 0 .. the number of steps."""
    depth = info.depth.flatten()
    counts = torch.bincount(depth, minlength=len(info.steps) + 1).double()
    return (counts / counts.sum()).tolist()


def recursion_figures(info: RecursionInfo, decisions: bool = True) -> dict[str, dict[int, float]]:
    """``{figure: {step: value}}`` over the recursion steps of one pass: ``capacity_used`` (share of
    the sequence the step processed) and, with ``decisions``, ``causal_acc``, ``causal_precision``,
    ``causal_recall`` of its causal decision against its top-k, among the tokens it chose from."""
    figures: dict[str, dict[int, float]] = {"capacity_used": {}}
    for step in info.steps:
        figures["capacity_used"][step.layer] = capacity_used(step).item()
    if decisions:
        for layer, counts in recursion_decision_counts(info).items():
            for name, value in quality_from_counts(counts).items():
                figures.setdefault(name, {})[layer] = value
    return figures


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


def expert_figures(infos: Sequence[ExpertInfo]) -> dict[str, dict[int, object]]:
    """``{figure: {layer: value}}`` over the mixture-of-experts MLPs: ``load`` (the share of picks of
    each real expert, a list), ``noop_fraction`` (with no-op experts), ``dropped`` and
    ``load_balance`` (unweighted; where computed)."""
    figures: dict[str, dict[int, object]] = {"load": {}, "noop_fraction": {}, "dropped": {}, "load_balance": {}}
    for info in infos:
        load = expert_load(info).tolist()
        figures["load"][info.layer] = load[: info.n_experts]
        if info.n_choices > info.n_experts:
            figures["noop_fraction"][info.layer] = sum(load[info.n_experts:])
        figures["dropped"][info.layer] = dropped_fraction(info).item()
        if info.load_balance is not None:
            figures["load_balance"][info.layer] = info.load_balance.item()
    return {name: values for name, values in figures.items() if values}
