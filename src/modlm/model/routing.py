"""Mixture-of-Depths routing: the router, the causal predictor, and the routed block.

A routed block wraps an ordinary ``Block``. Per sequence it picks the tokens to process, gathers
them (keeping temporal order and original positions), runs the block's residual update on those
tokens only, scales it by the router weight and scatter-adds it back. Tokens not picked skip the
block: their residual stream leaves it bit-for-bit unchanged, and they are not keys or values of
the block's attention.

Two ways to pick:

* ``"topk"`` (training): expert-choice top-k of the router logits over the sequence; ``k`` is fixed
  so shapes are static. Non-causal: whether token t is picked depends on later tokens.
* ``"causal"`` (inference): a per-token decision, ``sigmoid(r) > 0.5`` or the predictor MLP's
  ``sigmoid(p) > 0.5``. Rows pick different counts; they are gathered into a padded batch with the
  picked tokens first (in temporal order) and the padding after them, so the causal mask alone
  keeps every real token from seeing padding, and padding's updates are dropped.

Decoding one token per row (``Positions.policy`` set) needs neither: each row's decision is a yes or
a no. A row that says no does nothing in the block and stores nothing in its cache, so its cost is
the router alone where the host may decide (``DecodePolicy.host_decides``), and its update is
multiplied by 0 elsewhere.

So a routed block runs one of three passes: a whole sequence under top-k (training), a whole
sequence or a prompt under causal routing (evaluation, prefill: the picks are packed), or one
decoding step. Which one is explicit in its arguments: ``routing``, and ``where.policy`` for a step.

When the block's MLP is a mixture of experts (staged MoDE), it sees the picked tokens only and
routes them with the same mode (``moe.py``); ``RoutingInfo.experts`` says what it did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, Routing
from .layers import Block
from .moe import ExpertInfo
from .numerics import full_precision
from .positions import Positions, gather_tokens


@dataclass
class RoutingInfo:
    """What one routed block did in a forward pass (tensors are detached views for telemetry,
    except ``aux_loss``)."""

    layer: int
    """Index of the block in the model (set by the model's loop, not by the block: a block's
    training computation does not depend on where it sits, so compiled blocks of one kind share one
    graph); for a recursion step (``RecursionInfo.steps``), the step's index."""
    selected: torch.Tensor
    """(B, T) bool: tokens the block processed."""
    router_logits: torch.Tensor
    """(B, T) float32: router scores ``r``."""
    predictor_logits: Optional[torch.Tensor]
    """(B, T) float32 logits of the causal predictor, or None without one."""
    topk: Optional[torch.Tensor]
    """(B, T) bool: top-k membership of the router logits (the causal decision's target); None
    with a KV cache, where the rest of the sequence is not known."""
    aux_losses: dict[str, torch.Tensor]
    """Unweighted auxiliary losses of this block by name (``router_bce``, ``predictor_bce``)."""
    aux_loss: torch.Tensor
    """Scalar: this block's weighted auxiliary loss, attached to the graph (the model averages
    them into ``ModelOutput.aux_loss``); 0 when there is nothing to learn."""
    experts: Optional[ExpertInfo] = None
    """What the block's mixture-of-experts MLP did on the picked tokens (staged MoDE), if it has one."""
    causal: bool = False
    """Whether the pass routed causally: then ``selected`` is the causal decision itself."""


def causal_logits(router_logits: torch.Tensor, predictor_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """What causal routing thresholds at 0 (``sigmoid > 0.5``): the predictor's logits when the
    block has a predictor, else the router's."""
    return predictor_logits if predictor_logits is not None else router_logits


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the positions of the ``k`` largest scores, sorted into temporal order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def pack_selected(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-row selections of different sizes into one (B, k_max) tensor of positions.

    Returns ``(picks, n_real)``: each row lists its selected positions in temporal order, then
    unselected positions as padding, and ``n_real`` (B,) counts the selected ones. Padding always
    comes after every real token, so with a causal mask no real token attends to it.
    """
    n_real = selected.sum(dim=1)
    k_max = int(n_real.max())
    # A stable sort on "not selected" puts selected positions first, each group in temporal order.
    picks = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :k_max]
    return picks, n_real


def update_picked(update, x, weight, picks, n_real, where: Positions, cache, routing) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
    """Gather the picked tokens, run ``update`` (a block's residual update, ``(x, where, routing,
    cache) -> (f, info)``) on them alone, scale it by ``weight`` (B, T) and scatter-add it back;
    tokens not picked leave bit-for-bit unchanged. Also returns what the update's mixture-of-experts
    MLP did, if it has one."""
    if picks.size(1) == 0:
        return x, None
    delta, experts = update(gather_tokens(x, picks), where.gather(picks, n_real), routing, cache)
    weight = weight.gather(1, picks)
    if n_real is not None:  # padding's update is dropped
        weight = weight * (torch.arange(picks.size(1), device=x.device) < n_real.unsqueeze(1))
    # scatter_add wants one dtype: the update may be bf16 under autocast, the stream is not.
    contribution = (delta * weight.unsqueeze(-1)).to(x.dtype)
    return x.scatter_add(1, picks.unsqueeze(-1).expand(-1, -1, x.size(-1)), contribution), experts


def update_rows(update, x, keep, weight, where: Positions, cache) -> torch.Tensor:
    """A decoding step's update of the rows that ``keep`` (B,) says process their token, scaled by
    ``weight`` (B, 1): the others store nothing in ``cache`` and leave unchanged. Where the host may
    decide (``DecodePolicy.host_decides``) they also cost nothing; elsewhere every row computes and
    the others' updates are multiplied by 0."""
    if where.policy.host_decides:
        n = int(keep.sum())
        if n == 0:
            return x
        if n < x.size(0):
            rows = keep.nonzero().squeeze(1)
            delta, _ = update(x.index_select(0, rows), where.select_rows(rows), Routing.CAUSAL, cache)
            contribution = delta * weight.index_select(0, rows).unsqueeze(-1)
            return x.index_add(0, rows, contribution.to(x.dtype))
        step = replace(where, n_real=None)  # every row processes its token
    else:
        step = replace(where, n_real=keep.long())
        weight = weight * keep.unsqueeze(1)
    delta, _ = update(x, step, Routing.CAUSAL, cache)
    return x + (delta * weight.unsqueeze(-1)).to(x.dtype)


class RoutedBlock(nn.Module):
    """A ``Block`` behind a router: ``x_i + w(r_i) * f(X~)_i`` for picked tokens, ``x_i`` otherwise."""

    def __init__(self, cfg: ModelConfig, layer: int, capacity: Optional[float] = None):
        """``capacity``: the share of a sequence it processes in top-k routing (default: block
        ``layer``'s configured one)."""
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.block = self.make_block()
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        self.calibrating = False
        """Set by ``MoDTransformer.calibrate`` for its one pass: this block's threshold is computed then."""
        self.capacity: float = cfg.capacity_of(layer) if capacity is None else capacity
        """The share of a sequence this block processes in top-k routing: its configured capacity, or
        where a capacity schedule is training (``modlm.training.capacity``), that step's."""
        # The predictor reads the router's input through a stop-gradient: it learns to imitate
        # top-k membership causally without changing what the language model learns.
        self.predictor = (
            nn.Sequential(nn.Linear(cfg.d_model, cfg.predictor_hidden), nn.SiLU(), nn.Linear(cfg.predictor_hidden, 1))
            if cfg.causal_method == "predictor"
            else None
        )

    def make_block(self) -> Optional[nn.Module]:
        """The block this router owns and runs on its picks (a recursion step owns none: it runs the
        shared stack its recursion owns)."""
        return Block(self.cfg, self.layer)

    def update(self, x: torch.Tensor, where: Positions, routing: Routing, cache) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """The residual update ``f`` of the picked tokens ``x`` and what its mixture of experts did."""
        return self.block(x, where, routing, cache, residual=False)

    @property
    def unit(self) -> int:
        """Where this router's entries sit in ``decision_thresholds`` / ``decision_spreads``."""
        return self.cfg.routed_layers.index(self.layer)

    def decision_share(self) -> float:
        """The share of the tokens it may process that causal routing aims at (the controller's
        target, the calibrated threshold's quantile; random routing's probability)."""
        return self.cfg.capacity

    def reset_parameters(self) -> None:
        """Start the predictor at the base rate: sigmoid(bias) = capacity, so before it has learned
        anything it picks about the right number of tokens and its BCE starts at the entropy."""
        if self.predictor is not None:
            # A zero hidden bias keeps the initial output token-dependent (a random one would add
            # the same offset to every token and make the first decisions all-or-nothing).
            nn.init.zeros_(self.predictor[0].bias)
            c = min(self.capacity, 1 - 1e-3)
            nn.init.constant_(self.predictor[-1].bias, math.log(c / (1 - c)))

    def router_weight(self, r: torch.Tensor) -> torch.Tensor:
        """What multiplies the update of a token with router logit ``r`` (``ModelConfig.router_weight``)."""
        if self.cfg.router_weight == "sigmoid":
            return torch.sigmoid(r)
        if self.cfg.router_weight == "2sigmoid":  # 1 at r = 0: a zero router leaves the block's update as it is
            return 2 * torch.sigmoid(r)
        return r

    def topk_tokens(self, seq_len: int) -> int:
        """``k``: the tokens of a ``seq_len`` sequence this block processes in top-k routing."""
        return self.cfg.topk_tokens(seq_len, self.capacity)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Router logits ``r`` and the predictor's logits (None without one), (B, T), both computed
        in fp32 (``numerics``): they are compared with each other and with a threshold."""
        with full_precision(x.device.type):
            h = x.float()
            r = F.linear(h, self.router.weight.float()).squeeze(-1)
            p = None
            if self.predictor is not None:
                first, _, last = self.predictor
                hidden = F.silu(F.linear(h.detach(), first.weight.float(), first.bias.float()))
                p = F.linear(hidden, last.weight.float(), last.bias.float()).squeeze(-1)
        return r, p

    def decide(self, r: torch.Tensor, p: Optional[torch.Tensor], valid: Optional[torch.Tensor] = None,
               cache=None) -> torch.Tensor:
        """The causal per-token decision (B, T) bool (``ModelConfig.causal_decision``): each token
        from its own scores and, when controlled, the row's earlier decisions; never a later token.
        ``valid`` (B, T) marks the tokens it may process (padding, and in a recursion step the
        tokens the step before did not process, never are and move no controller); a ``cache`` (a
        ``KVCache``, or a recursion step's ``StackCache``) carries the controller's per-row threshold
        between calls."""
        if self.cfg.random_routing:
            decided = torch.rand_like(r) < self.decision_share()
        else:
            logit = causal_logits(r, p) if self.cfg.decision_logit == "trained" else self._standardized(r, valid, cache)
            mode = "calibrated" if self.calibrating else self.cfg.causal_decision
            if self.calibrating:  # this block's threshold from these very logits (MoDTransformer.calibrate)
                self._set_threshold(logit, valid)
            if mode == "plain":
                decided = logit > 0
            elif mode == "calibrated":
                decided = logit > self.cfg.unit_threshold(self.unit)
            else:
                decided = self._controlled(logit, valid, cache)
        return decided if valid is None else decided & valid

    def _standardized(self, r: torch.Tensor, valid: Optional[torch.Tensor], cache) -> torch.Tensor:
        """``(r_t - mean) / std`` over the row's real tokens up to and including t (and, with a
        ``cache``, the row's earlier tokens, whose moments it carries)."""
        w = r.new_ones(r.shape) if valid is None else valid.to(r.dtype)
        moments = torch.stack([w, w * r, w * r * r], dim=-1).cumsum(dim=1)  # (B, T, 3)
        if cache is not None:
            if cache.router_moments is not None:
                moments = moments + cache.router_moments.unsqueeze(1)
            cache.router_moments = moments[:, -1]
        count = moments[..., 0].clamp(min=1)
        mean = moments[..., 1] / count
        var = (moments[..., 2] / count - mean * mean).clamp(min=1e-6)
        return (r - mean) / var.sqrt()

    def _set_threshold(self, logit: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
        """The (1 - capacity) quantile of ``logit`` over the real tokens: exactly the capacity's share
        of them is above it (ties aside)."""
        values = (logit if valid is None else logit[valid]).flatten().float()
        k = max(1, min(values.numel(), round(self.decision_share() * values.numel())))
        index = self.unit
        self.cfg.decision_thresholds[index] = float(values.topk(k).values[-1]) - 1e-6
        self.cfg.decision_spreads[index] = max(float(values.std()), 1e-6) if values.numel() > 1 else 1.0

    def _controlled(self, logit: torch.Tensor, valid: Optional[torch.Tensor], cache) -> torch.Tensor:
        """Integral control of each row's share processed: token t is processed iff its logit is above
        the row's threshold, which then moves by ``budget_gain * spread * (processed - capacity)``.
        Token by token (a prompt or an evaluation window is a loop over its positions; a decoding
        step is one)."""
        cfg = self.cfg
        gain = cfg.budget_gain * cfg.unit_spread(self.unit)
        share = self.decision_share()
        threshold = cache.decision_threshold if cache is not None else None
        if threshold is None:
            threshold = logit.new_full(logit.shape[:1], cfg.unit_threshold(self.unit), dtype=torch.float32)
        decisions = []
        for t in range(logit.size(1)):
            decided = logit[:, t] > threshold
            step = decided.float() - share
            if valid is not None:
                decided, step = decided & valid[:, t], step * valid[:, t]
            decisions.append(decided)
            threshold = threshold + gain * step
        if cache is not None:
            cache.decision_threshold = threshold
        return torch.stack(decisions, dim=1)

    def forward(
        self, x: torch.Tensor, where: Positions, routing: Routing = Routing.TOPK, cache=None,
        eligible: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[RoutingInfo]]:
        """Returns the new residual stream and what was routed.

        With a ``cache`` (a prompt or a decoding step; routing is then causal) top-k membership and
        the aux losses, which need the whole sequence, are not computed, and a decoding step reports
        nothing (``None``): it is the hot loop of generation. ``eligible`` (B, T) bool, or (B, 1) on a
        decoding step: the only tokens it may pick (a recursion step's hierarchical filtering: those
        the step before processed); None: every token.
        """
        r, p = self.scores(x)
        if where.policy is not None:
            return self._decode_step(x, r, p, where, cache, eligible)[0], None

        B, T, _ = x.shape
        topk = None
        if cache is None:  # the whole sequence is here: top-k membership (the causal decision's target) exists
            scores = torch.rand_like(r) if self.cfg.random_routing else r
            if eligible is not None:  # k never exceeds the eligible count (capacities do not increase)
                scores = scores.masked_fill(~eligible, float("-inf"))
            topk_picks = topk_indices(scores, self.topk_tokens(T))
            topk = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, topk_picks, True)
        if routing == Routing.TOPK:
            picks, n_real, selected = topk_picks, None, topk
        else:
            valid = where.valid(T)  # padding is never processed
            if eligible is not None:
                valid = eligible if valid is None else valid & eligible
            selected = self.decide(r, p, valid, cache)
            picks, n_real = pack_selected(selected)
        x, experts = self._update_picked(x, r, picks, n_real, where, cache, routing)

        aux_losses, aux = self._aux_losses(r, p, topk, eligible) if topk is not None else ({}, r.new_zeros(()))
        info = RoutingInfo(
            layer=-1,  # the model names it
            selected=selected.detach(),
            router_logits=r.detach(),
            predictor_logits=None if p is None else p.detach(),
            topk=None if topk is None else topk.detach(),
            aux_losses={name: loss.detach() for name, loss in aux_losses.items()},
            aux_loss=aux,
            experts=experts,
            causal=routing == Routing.CAUSAL,
        )
        return x, info

    def _update_picked(self, x, r, picks, n_real, where: Positions, cache, routing) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        return update_picked(self.update, x, self.router_weight(r), picks, n_real, where, cache, routing)

    def _decode_step(self, x, r, p, where: Positions, cache, eligible: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row: a yes/no per row, no sorting, no gather along the sequence. Returns
        the new stream and the decision (B,) bool.

        Rows that skip store nothing in this block's cache and leave the block unchanged. Where the
        host may decide (``DecodePolicy.host_decides``), they also cost nothing beyond the router.
        """
        valid = None if where.n_real is None else (where.n_real > 0).unsqueeze(1)
        if eligible is not None:
            valid = eligible if valid is None else valid & eligible
        keep = self.decide(r, p, valid, cache)[:, 0]
        return update_rows(self.update, x, keep, self.router_weight(r), where, cache), keep

    def _aux_losses(self, r, p, topk, eligible=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """BCE of the causal decision's logits against top-k membership, per row and token: over
        the ``eligible`` tokens only, when given (the others are never asked)."""
        if self.cfg.random_routing:  # membership is noise; there is nothing to learn
            return {}, r.new_zeros(())
        target = topk.to(r.dtype)
        weight = None if eligible is None else eligible.to(r.dtype)

        def bce(logits):
            if weight is None:
                return F.binary_cross_entropy_with_logits(logits, target)
            losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            return (losses * weight).sum() / weight.sum().clamp(min=1)

        if p is not None:
            loss = bce(p)
            return {"predictor_bce": loss}, self.cfg.predictor_aux_weight * loss
        loss = bce(r)
        return {"router_bce": loss}, self.cfg.router_aux_weight * loss
