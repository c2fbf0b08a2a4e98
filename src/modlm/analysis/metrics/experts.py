"""Mixture-of-experts MLPs' figures (``ExpertInfo``), per MLP ``layer_i``:

load.layer_i.expert_e   share of the picks that went to real expert e (before capacity: what the
                        router asked for)
noop_fraction           share of the picks that chose a no-op expert: MLP work skipped (integrated MoDE)
dropped                 share of the picks of real experts that their expert did not compute (over its
                        training capacity)
expert_slots            expert MLP passes computed per sequence (what ``modlm.flops.expert_passes``
                        counts, measured)
load_balance            the load-balancing loss, unweighted (1 = balanced), where computed
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...model.config import ModelConfig
from ...model.moe import ExpertInfo
from .base import KindMetrics, plain_figures, ratio


def _real_picks(info: ExpertInfo) -> torch.Tensor:
    """(B, n, k) bool: the picks of real tokens (padding's picks are not routing decisions)."""
    picks = torch.ones_like(info.computed)
    return picks if info.valid is None else picks & info.valid.unsqueeze(-1)


def expert_picks(info: ExpertInfo) -> torch.Tensor:
    """(n_choices,) picks of real tokens each expert got, real experts first, then the no-op ones."""
    return torch.bincount(info.expert[_real_picks(info)].flatten(), minlength=info.n_choices).double()


def expert_load(info: ExpertInfo) -> torch.Tensor:
    """(n_choices,) share of the picks that went to each expert; sums to 1."""
    counts = expert_picks(info)
    return counts / counts.sum().clamp(min=1)


def noop_fraction(info: ExpertInfo) -> torch.Tensor:
    """Share of the picks that chose a no-op expert."""
    return expert_load(info)[info.n_experts :].sum()


def dropped_fraction(info: ExpertInfo) -> torch.Tensor:
    """Share of the picks of real experts that their expert did not compute (over its capacity)."""
    wanted = _real_picks(info) & (info.expert < info.n_experts)
    return (wanted & ~info.computed).sum().double() / wanted.sum().clamp(min=1)


def passes_per_row(info: ExpertInfo) -> torch.Tensor:
    """Expert MLP passes computed per sequence, on average over the batch's rows."""
    return info.computed.sum() / info.computed.size(0)


class ExpertMetrics(KindMetrics):
    prefix = "moe"

    def tally(
        self, infos: Sequence[ExpertInfo], cfg: ModelConfig, input_ids=None, eot_id=None
    ) -> dict[str, torch.Tensor]:
        out = {}
        for info in infos:
            where = f"layer_{info.layer}"
            picks = expert_picks(info)  # real experts first, then the no-op ones
            out[f"load.{where}"] = torch.cat([picks[: info.n_experts], picks.sum().unsqueeze(0)])
            if info.n_choices > info.n_experts:
                out[f"noop_fraction.{where}"] = ratio(picks[info.n_experts :].sum(), picks.sum())
            wanted = _real_picks(info) & (info.expert < info.n_experts)
            out[f"dropped.{where}"] = ratio((wanted & ~info.computed).sum(), wanted.sum())
            out[f"expert_slots.{where}"] = ratio(info.computed.sum(), info.computed.size(0))
            if info.load_balance is not None:
                out[f"load_balance.{where}"] = ratio(info.load_balance, 1)
        if input_ids is not None:  # a routed block that picked nothing ran no expert: 0 passes for its rows
            ran = {info.layer for info in infos}
            for layer in cfg.expert_layers:
                if layer not in ran:
                    out[f"expert_slots.layer_{layer}"] = ratio(0, input_ids.size(0)).to(input_ids.device)
        return out

    def figures(self, tallies: dict[str, torch.Tensor]) -> dict[str, float]:
        loads = {key: value for key, value in tallies.items() if key.startswith("load.")}
        out = plain_figures({key: value for key, value in tallies.items() if key not in loads})
        for key, value in loads.items():  # [picks of each real expert ..., picks of every expert]
            shares = (value[:-1] / value[-1].clamp(min=1)).tolist()
            out.update({f"{key}.expert_{e}": share for e, share in enumerate(shares)})
        return out

    def ran(self, infos: Sequence[ExpertInfo], cfg: ModelConfig) -> dict:
        """Each mixture at the expert passes it computed per row (0 where it ran on no token)."""
        if not cfg.expert_layers:
            return {}
        passes = {info.layer: float(info.computed.sum()) / info.computed.size(0) for info in infos}
        return {"passes_per_expert_layer": [passes.get(layer, 0.0) for layer in cfg.expert_layers]}
