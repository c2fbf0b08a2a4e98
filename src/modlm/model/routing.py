"""Mixture-of-Depths routing: the ``Router`` (router, causal predictor, causal decision) and the routed
blocks built on it.

A routed block wraps an ordinary ``Block``. Per sequence its router picks the tokens to process; they are
gathered (keeping temporal order and original positions), the routed part of the block runs on those
tokens only, its update is scaled by the router weight and scatter-added back. Tokens not picked skip it:
their residual stream leaves it bit-for-bit unchanged, and they are not keys or values of the block's
attention. What is routed is a class each:

* ``RoutedBlock``: the whole block (attention and MLP): Mixture-of-Depths;
* ``RoutedAttention``: the attention sublayer only; the MLP then runs for every token (the Router-Tuning /
  MindSkip form, for converted models: ``route_part="attention"``).

A router picks in one of two ways:

* ``"topk"`` (training): expert-choice top-k of the router logits over the sequence; ``k`` is fixed so
  shapes are static. Non-causal: whether token t is picked depends on later tokens.
* ``"causal"`` (inference): the causal decision per token (``decision.py``). Rows pick different counts;
  they are gathered into a padded batch with the picked tokens first (in temporal order) and the padding
  after them, so the causal mask alone keeps every real token from seeing padding, and padding's updates
  are dropped.

Decoding one token per row (``Positions.policy`` set) needs neither: each row's decision is a yes or a
no. A row that says no does nothing in the routed part and stores nothing in its cache, so its cost is
the router alone where the host may decide (``DecodePolicy.host_decides``), and its update is multiplied
by 0 elsewhere.

So a routed block runs one of three passes: a whole sequence under top-k (training), a whole sequence or
a prompt under causal routing (evaluation, prefill: the picks are packed), or one decoding step. Which one
is explicit in its arguments: ``routing``, a ``cache``, and ``where.policy`` for a step.

A recursion step (``recursion.py``) is a ``Router`` in front of the recursion's shared stack: it composes
the same router, not a routed block. When a routed block's MLP is a mixture of experts (staged MoDE), it
sees the tokens the MLP runs on and routes them with the same mode (``moe.py``); ``RoutingInfo.experts``
says what it did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, Routing
from .decision import DecisionState, make_decision
from .kv_cache import KVCache
from .layers import Block
from .mixture import MixtureInfo
from .moe import ExpertInfo
from .numerics import full_precision
from .positions import Positions, gather_tokens


@dataclass
class RoutingInfo(MixtureInfo):
    """What one router did in a forward pass (tensors are detached views for telemetry, except
    ``aux_loss``)."""

    layer: int
    """Index of the block in the model (set by the model's loop); for a recursion step
    (``RecursionInfo.steps``), the step's index."""
    selected: torch.Tensor
    """(B, T) bool: tokens the block processed."""
    router_logits: torch.Tensor
    """(B, T) float32: router scores ``r``."""
    predictor_logits: Optional[torch.Tensor]
    """(B, T) float32 logits of the causal predictor, or None without one."""
    topk: Optional[torch.Tensor]
    """(B, T) bool: top-k membership of the router logits (the causal decision's target); None with a KV
    cache, where the rest of the sequence is not known."""
    aux_losses: dict[str, torch.Tensor]
    """Unweighted auxiliary losses of this router by name (``router_bce``, ``predictor_bce``)."""
    aux_loss: torch.Tensor
    """Scalar: this router's weighted auxiliary loss, attached to the graph; 0 when there is nothing to
    learn."""
    experts: Optional[ExpertInfo] = None
    """What the block's mixture-of-experts MLP did (staged MoDE), if it has one."""
    causal: bool = False
    """Whether the pass routed causally: then ``selected`` is the causal decision itself."""
    eligible: Optional[torch.Tensor] = None
    """(B, T) bool: the tokens it chose among (a recursion step: those the step before processed); None:
    every token."""

    def parts(self) -> list[MixtureInfo]:
        return [self] if self.experts is None else [self, self.experts]


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the positions of the ``k`` largest scores, sorted into temporal order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def pack_selected(selected: torch.Tensor, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-row selections of different sizes into one (B, k) tensor of positions.

    Returns ``(picks, n_real)``: each row lists its selected positions in temporal order, then unselected
    positions as padding, and ``n_real`` (B,) counts the selected ones. Padding always comes after every
    real token, so with a causal mask no real token attends to it. ``k`` (at least every row's count):
    the width; default the largest count, read on the host.
    """
    n_real = selected.sum(dim=1)
    width = int(n_real.max()) if k is None else k
    # A stable sort on "not selected" puts selected positions first, each group in temporal order.
    picks = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]
    return picks, n_real


def update_picked(
    update, x, weight, picks, n_real, where: Positions, cache, routing
) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
    """Gather the picked tokens, run ``update`` (a residual update, ``(x, where, routing, cache) -> (f,
    info)``) on them alone, scale it by ``weight`` (B, T) and scatter-add it back; tokens not picked leave
    bit-for-bit unchanged. Also returns what the update's mixture-of-experts MLP did, if it has one."""
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
    ``weight`` (B, 1): the others store nothing in ``cache`` and leave unchanged. Where the host may decide
    (``DecodePolicy.host_decides``) they also cost nothing; elsewhere every row computes and the others'
    updates are multiplied by 0."""
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


@dataclass
class Choice:
    """The tokens a router picked in a pass over whole sequences or a prompt."""

    r: torch.Tensor
    """(B, T) router logits."""
    p: Optional[torch.Tensor]
    """(B, T) predictor logits, or None."""
    picks: torch.Tensor
    """(B, k) positions of the picked tokens, temporal order, padding after the real ones."""
    n_real: Optional[torch.Tensor]
    """(B,) real picks per row; None: every pick is real (top-k)."""
    selected: torch.Tensor
    """(B, T) bool: the picked tokens."""
    topk: Optional[torch.Tensor]
    """(B, T) bool top-k membership (the causal decision's target), None when not known (a prompt)."""


class Router(nn.Module):
    """What every Mixture-of-Depths router holds: the router ``r = w . x`` (``weight``, one scalar per
    token), the causal predictor (an MLP on the stop-gradient router input, with
    ``causal_method="predictor"``), and the causal decision; and how it picks tokens with them.

    ``capacity`` is the share of a sequence it processes in top-k routing (a capacity schedule may set it
    per step); ``share`` is the share of the tokens it may process that its causal decision aims at (a
    routed block: its configured capacity; a recursion step: of the tokens the step before processed)."""

    def __init__(self, cfg: ModelConfig, capacity: float, share: float):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(1, cfg.d_model))
        # Drawn as nn.Linear(d, 1) draws its weight (``init_weights`` then draws it again): the router was
        # one, and a seed keeps building the same model it built then.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # The predictor reads the router's input through a stop-gradient: it learns to imitate top-k
        # membership causally without changing what the language model learns.
        self.predictor = (
            nn.Sequential(nn.Linear(cfg.d_model, cfg.predictor_hidden), nn.SiLU(), nn.Linear(cfg.predictor_hidden, 1))
            if cfg.causal_method == "predictor"
            else None
        )
        self.decision = make_decision(cfg, share)
        self.capacity: float = capacity
        """The share of a sequence processed in top-k routing: the configured capacity, or where a capacity
        schedule is training (``modlm.training.capacity``), that step's."""

    def reset_parameters(self) -> None:
        """The router weight as every matrix (``init_weights``); the predictor at the base rate:
        sigmoid(bias) = capacity, so before it has learned anything it picks about the right number of
        tokens and its BCE starts at the entropy."""
        if self.predictor is not None:
            # A zero hidden bias keeps the initial output token-dependent (a random one would add the same
            # offset to every token and make the first decisions all-or-nothing).
            nn.init.zeros_(self.predictor[0].bias)
            c = min(self.capacity, 1 - 1e-3)
            nn.init.constant_(self.predictor[-1].bias, math.log(c / (1 - c)))

    def topk_tokens(self, seq_len: int) -> int:
        """``k``: the tokens of a ``seq_len`` sequence processed in top-k routing."""
        return self.cfg.topk_tokens(seq_len, self.capacity)

    def weight_of(self, r: torch.Tensor) -> torch.Tensor:
        """What multiplies the update of a token with router logit ``r`` (``ModelConfig.router_weight``)."""
        if self.cfg.router_weight == "sigmoid":
            return torch.sigmoid(r)
        if self.cfg.router_weight == "2sigmoid":  # 1 at r = 0: a zero router leaves the update as it is
            return 2 * torch.sigmoid(r)
        return r

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Router logits ``r`` and the predictor's logits (None without one), (B, T), both computed in fp32
        (``numerics``): they are compared with each other and with a threshold."""
        with full_precision(x.device.type):
            h = x.float()
            r = F.linear(h, self.weight.float()).squeeze(-1)
            p = None
            if self.predictor is not None:
                first, _, last = self.predictor
                hidden = F.silu(F.linear(h.detach(), first.weight.float(), first.bias.float()))
                p = F.linear(hidden, last.weight.float(), last.bias.float()).squeeze(-1)
        return r, p

    def choose(
        self,
        x: torch.Tensor,
        where: Positions,
        routing: Routing,
        state: Optional[DecisionState] = None,
        whole: bool = True,
        eligible: Optional[torch.Tensor] = None,
    ) -> Choice:
        """Pick tokens of (B, T, d) ``x``: top-k, or the causal decision (carrying ``state`` along the rows).
        ``whole``: the sequences are whole (no KV cache), so top-k membership, the causal decision's target,
        exists; ``eligible`` (B, T) bool: the only tokens it may pick (None: every token)."""
        r, p = self.scores(x)
        B, T = r.shape
        topk = topk_picks = None
        if whole:
            scores = torch.rand_like(r) if self.cfg.random_routing else r
            if eligible is not None:  # k never exceeds the eligible count (capacities do not increase)
                scores = scores.masked_fill(~eligible, float("-inf"))
            topk_picks = topk_indices(scores, self.topk_tokens(T))
            topk = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, topk_picks, True)
        if routing == Routing.TOPK:
            return Choice(r, p, topk_picks, None, topk, topk)
        valid = where.valid(T)  # padding is never processed
        if eligible is not None:
            valid = eligible if valid is None else valid & eligible
        selected = self.decision(r, p, valid, state)
        picks, n_real = pack_selected(selected)
        return Choice(r, p, picks, n_real, selected, topk)

    def keep(
        self, x: torch.Tensor, where: Positions, state: Optional[DecisionState], eligible: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: the router logits (B, 1) and whether each row processes its token (B,)."""
        r, p = self.scores(x)
        valid = None if where.n_real is None else (where.n_real > 0).unsqueeze(1)
        if eligible is not None:
            valid = eligible if valid is None else valid & eligible
        return r, self.decision(r, p, valid, state)[:, 0]

    def report(
        self,
        choice: Choice,
        routing: Routing,
        eligible: Optional[torch.Tensor] = None,
        experts: Optional[ExpertInfo] = None,
    ) -> RoutingInfo:
        """What it did, with its auxiliary losses when top-k membership is known."""
        r, p = choice.r, choice.p
        aux_losses, aux = (
            self.aux_losses(r, p, choice.topk, eligible) if choice.topk is not None else ({}, r.new_zeros(()))
        )
        return RoutingInfo(
            layer=-1,  # the model names it
            selected=choice.selected.detach(),
            router_logits=r.detach(),
            predictor_logits=None if p is None else p.detach(),
            topk=None if choice.topk is None else choice.topk.detach(),
            aux_losses={name: loss.detach() for name, loss in aux_losses.items()},
            aux_loss=aux,
            experts=experts,
            causal=routing == Routing.CAUSAL,
            eligible=None if eligible is None else eligible.detach(),
        )

    def aux_losses(self, r, p, topk, eligible=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """BCE of the causal decision's logits against top-k membership, per row and token: over the
        ``eligible`` tokens only, when given (the others are never asked)."""
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


class RoutedBlock(nn.Module):
    """A ``Block`` behind a ``Router``: ``x_i + w(r_i) * f(X~)_i`` for picked tokens, ``x_i`` otherwise."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.block = Block(cfg, layer)
        capacity = cfg.capacity_of(layer)
        self.router = Router(cfg, capacity=capacity, share=capacity)

    def reset_parameters(self) -> None:
        self.router.reset_parameters()

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """Its KV cache, holding the decision's per-row state too."""
        cfg = self.cfg
        cache = KVCache(batch_size, max_len, cfg.kv_heads, cfg.head_dim, device, dtype)
        cache.decision = self.router.decision.new_state(batch_size, device)
        return cache

    def update(
        self, x: torch.Tensor, where: Positions, routing: Routing, cache
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """The routed part's residual update of the picked tokens ``x``, and what its mixture of experts
        did: the whole block's."""
        return self.block(x, where, routing, cache, residual=False)

    def after(
        self, x: torch.Tensor, where: Positions, routing: Routing, cache
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """What every token gets after the routed part (nothing: the whole block was routed)."""
        return x, None

    def forward(
        self, x: torch.Tensor, where: Positions, routing: Routing = Routing.TOPK, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[RoutingInfo]]:
        """Returns the new residual stream and what was routed.

        With a ``cache`` (a prompt or a decoding step; routing is then causal) top-k membership and the aux
        losses, which need the whole sequence, are not computed, and a decoding step reports nothing
        (``None``): it is the hot loop of generation.
        """
        state = None if cache is None else cache.decision
        if where.policy is not None:  # one token per row: a yes or a no each
            r, keep = self.router.keep(x, where, state)
            x = update_rows(self.update, x, keep, self.router.weight_of(r), where, cache)
            return self.after(x, where, routing, cache)[0], None
        choice = self.router.choose(x, where, routing, state, whole=cache is None)
        x, experts = update_picked(
            self.update, x, self.router.weight_of(choice.r), choice.picks, choice.n_real, where, cache, routing
        )
        x, after_experts = self.after(x, where, routing, cache)
        return x, self.router.report(choice, routing, experts=experts or after_experts)


class RoutedAttention(RoutedBlock):
    """A ``Block`` whose attention sublayer alone is behind the router: a picked token attends (and is a
    key and value of the block), weighted by ``w(r)``; a skipped one neither attends nor is attended to;
    the MLP then runs for every token."""

    def update(self, x, where, routing, cache):
        return self.block.attention_update(x, where, cache), None

    def after(self, x, where, routing, cache):
        update, experts = self.block.mlp_update(x, where, routing, cached=cache is not None)
        return x + update, experts
