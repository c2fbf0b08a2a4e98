"""Routed blocks' figures (``RoutingInfo`` of ``RoutedBlock`` / ``RoutedAttention``), per block ``layer_i``:

  capacity_used     share of the tokens the block processed (top-k: exactly k/T)
  causal_acc        the causal decision against top-k membership (also causal_precision, causal_recall:
                    with 12.5% positives, accuracy alone flatters); not for random routing
  overlap           share of the block's picks that the next routed block picks too
  selected_first    share of rows whose first position is picked
  selected_eot      share of picks that are the end-of-text token

and histograms of the router logits (``weight``) and of the positions picked (``selected_pos``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...model.config import ModelConfig
from ...model.decision import trained_logit
from ...model.routing import RoutingInfo
from .base import KindMetrics, decision_counts, ratio


def causal_decision(info: RoutingInfo) -> torch.Tensor:
    """The per-token causal decision: in a causal pass, the one it made (whatever ``causal_decision``
    is); in a top-k pass (training), the one the BCE trains, the sign of the predictor's logit (or the
    router's without a predictor)."""
    if info.causal:
        return info.selected
    return trained_logit(info.router_logits, info.predictor_logits, None, None) > 0


def router_decision_counts(info: RoutingInfo) -> torch.Tensor:
    """``decision_counts`` of a router's causal decision against top-k membership, among the tokens it
    chose from (a recursion step's eligible ones)."""
    decision, target = causal_decision(info), info.topk
    if info.eligible is not None:
        decision, target = decision[info.eligible], target[info.eligible]
    return decision_counts(decision, target)


def router_tallies(info: RoutingInfo, where: str, random_routing: bool) -> dict[str, torch.Tensor]:
    """What every router reports (routed blocks and recursion steps alike): the share it processed and,
    where top-k membership is known and the routing is learned, its causal decision's counts."""
    out = {f"capacity_used.{where}": ratio(info.selected.sum(), info.selected.numel())}
    if info.topk is not None and not random_routing:
        out[f"decision.{where}"] = router_decision_counts(info)
    return out


class RoutedMetrics(KindMetrics):
    prefix = "router"

    def tally(
        self, infos: Sequence[RoutingInfo], cfg: ModelConfig, input_ids=None, eot_id=None
    ) -> dict[str, torch.Tensor]:
        out = {}
        for n, info in enumerate(infos):
            where, selected = f"layer_{info.layer}", info.selected
            out.update(router_tallies(info, where, cfg.random_routing))
            out[f"selected_first.{where}"] = ratio(selected[:, 0].sum(), selected.size(0))
            if input_ids is not None and eot_id is not None:
                out[f"selected_eot.{where}"] = ratio((selected & (input_ids == eot_id)).sum(), selected.sum())
            if n + 1 < len(infos):
                out[f"overlap.{where}"] = ratio((selected & infos[n + 1].selected).sum(), selected.sum())
        return out

    def histograms(self, infos: Sequence[RoutingInfo]) -> dict[str, torch.Tensor]:
        out = {}
        for info in infos:
            out[f"weight.layer_{info.layer}"] = info.router_logits.float()
            positions = info.selected.nonzero()[:, 1]
            if positions.numel():
                out[f"selected_pos.layer_{info.layer}"] = positions
        return out

    def selections(self, infos: Sequence[RoutingInfo]) -> list[tuple[str, torch.Tensor]]:
        return [(f"layer_{info.layer}", info.selected) for info in infos]

    def depth(self, infos: Sequence[RoutingInfo], cfg: ModelConfig):
        passed = torch.stack([info.selected for info in infos]).sum(dim=0) if infos else 0
        return len(infos), passed

    def ran(self, infos: Sequence[RoutingInfo], cfg: ModelConfig) -> dict:
        """Each routed block at the tokens its padded batch held (the most any row picked: causal routing
        packs the picks of every row to that length)."""
        if not infos:
            return {}
        return {"tokens_per_routed_block": [int(info.selected.sum(dim=1).max()) for info in infos]}
