"""Mixture-of-Recursions: one shared stack of blocks applied up to ``recursions`` times per token.

A ``Recursion`` owns the shared stack (``SharedStack``: its blocks, run as one residual update) and,
with expert-choice routing, one ``Router`` per step (``routing.py``: the router, predictor and causal
decision every routed block has). Step r picks its tokens as a routed block does (top-k of its router
in training, the causal decision at inference; gather, update at original positions, scale by the
router weight, scatter-add), runs the stack on them, with one more rule, hierarchical filtering: it
picks only among the tokens step r - 1 processed. So a token's depth is the number of steps that picked it, and it
exits at the first
step that does not. Its k is ``ModelConfig.step_capacities[r]`` of the sequence, so every step but
the first picks the share ``capacity[r] / capacity[r - 1]`` of the tokens it sees, and that share is
what its causal decision aims at (a step whose share is 1 keeps, causally too, every token it may).

With token choice (``recursion_routing="token_choice"``) one router at the recursion's input gives
each token its depth up front, the most probable of 1 .. N_r from the token alone (so the same in
training and inference, and causal); step r processes the tokens whose depth exceeds r, packed as
a routed block's causal picks, each update weighted by the depth's probability; a load-balancing
loss keeps the depths near uniform. In training (top-k routing) step r has a fixed number of slots,
``ModelConfig.token_choice_slots``, filled in temporal order (so the shapes are static and what a
token gets depends on earlier tokens only; a token past them exits there), as a mixture of experts'
capacity is; causal routing keeps every token its depth asks for. With ``recursion_routing="dense"`` every token
takes every step
and there are no routers: the recursive baseline.

Keys and values (``ModelConfig.recursion_kv``): recursion-wise, each step has its own caches (a
``StackCache``, one ``KVCache`` per block of the stack) and stores, and attends over, exactly the
tokens it processed, as a routed block does; shared (recursive KV sharing), the first step's keys
and values are kept (a ``KVRecord`` per block over whole sequences, its ``KVCache`` when decoding)
and every later step's queries attend over them (``SharedKV``), computing and caching none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, Routing
from .kv_cache import KVCache, KVRecord, SharedKV, StackCache
from .layers import Block
from .mixture import MixtureInfo
from .numerics import full_precision
from .positions import Positions
from .routing import Router, RoutingInfo, pack_selected, update_picked, update_rows


@dataclass
class RecursionInfo(MixtureInfo):
    """What a recursion did in a forward pass: one ``RoutingInfo`` per routed step, in step order
    (its ``layer`` is the step's index, its ``eligible`` the tokens the step before processed; a token's
    ``selected`` at step r implies its ``selected`` at r - 1). Under token choice a step's
    ``router_logits`` hold the probability of each token's depth (what weighs its update) and it has no
    ``topk``."""

    steps: list[RoutingInfo]
    balance: Optional[torch.Tensor] = None
    """Token choice: the load-balancing loss, weighted, attached to the graph (None otherwise)."""
    balance_loss: Optional[torch.Tensor] = None
    """Token choice: the load-balancing loss unweighted, detached."""
    layer: int = -1
    """Index of the recursion among the model's blocks (set by the model's loop)."""

    @property
    def depth(self) -> torch.Tensor:
        """(B, T) recursion steps each token took."""
        return torch.stack([step.selected for step in self.steps]).sum(dim=0)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Mean over the steps of their weighted auxiliary losses, plus token choice's balance (attached
        to the graph)."""
        loss = torch.stack([step.aux_loss for step in self.steps]).mean()
        return loss if self.balance is None else loss + self.balance

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted, detached: each of the steps' losses averaged over the steps, and token choice's
        ``recursion_balance``."""
        names = dict.fromkeys(name for step in self.steps for name in step.aux_losses)
        out = {name: torch.stack([step.aux_losses[name] for step in self.steps]).mean() for name in names}
        if self.balance_loss is not None:
            out["recursion_balance"] = self.balance_loss
        return out


class SharedStack(nn.Module):
    """The blocks one recursion step applies, as a single residual update (the sum of its blocks'
    updates, each block reading the stream the ones before it made)."""

    def __init__(self, cfg: ModelConfig, first_layer: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, first_layer + j) for j in range(cfg.stack_layers))

    def forward(
        self,
        x: torch.Tensor,
        where: Positions,
        routing: Routing = Routing.TOPK,
        cache: Optional[StackCache] = None,
        residual: bool = True,
    ) -> tuple[torch.Tensor, None]:
        """``(x + f(x), None)``, or ``f(x)`` with ``residual=False``: the update built from its
        blocks' own updates (never as a difference of streams), so the router weight scales it
        without cancellation error."""
        h, total = x, None
        caches = cache.blocks if cache is not None else [None] * len(self.blocks)
        kvs = where.kv if where.kv is not None else [None] * len(self.blocks)
        for block, block_cache, kv in zip(self.blocks, caches, kvs):
            update, _ = block(h, replace(where, kv=kv), routing, block_cache, residual=False)
            h = h + update
            total = update if total is None else total + update
        return (h if residual else total), None


class Recursion(nn.Module):
    """The shared stack applied ``cfg.recursions`` times: routed per step (expert choice with
    hierarchical filtering), to the depth a router gives each token up front (token choice), or to
    every token (``recursion_routing="dense"``). Called as every block is, ``recursion(x, where,
    routing, cache)``; returns ``(x, RecursionInfo)`` (None for the dense recursion and on a
    decoding step). Its cache is a list of ``StackCache``, one per step (``new_cache``)."""

    def __init__(self, cfg: ModelConfig, first_layer: int):
        super().__init__()
        self.cfg = cfg
        self.stack = SharedStack(cfg, first_layer)
        capacities = cfg.step_capacities
        self.steps = nn.ModuleList(
            Router(cfg, capacity=capacities[r], share=capacities[r] / (capacities[r - 1] if r else 1.0))
            for r in cfg.routed_steps
        )
        """Expert choice: step r's router; its decision aims at the share of the tokens step r - 1 processed
        that step r processes."""
        self.depth_router = (
            nn.Linear(cfg.d_model, cfg.recursions, bias=False) if cfg.recursion_routing == "token_choice" else None
        )

    def reset_parameters(self) -> None:
        for router in self.steps:
            router.reset_parameters()

    @property
    def shares_kv(self) -> bool:
        return self.cfg.recursion_kv == "shared"

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list[StackCache]:
        """One ``StackCache`` per step (with its router's decision state); under KV sharing only the first
        step's hold ``KVCache``s."""
        cfg = self.cfg

        def caches(step):
            if step and self.shares_kv:
                return [None] * len(self.stack.blocks)
            return [KVCache(batch_size, max_len, cfg.kv_heads, cfg.head_dim, device, dtype) for _ in self.stack.blocks]

        def decision(step):
            return self.steps[step].decision.new_state(batch_size, device) if self.steps else None

        return [StackCache(caches(r), batch_size, decision(r), device) for r in range(cfg.recursions)]

    def step_positions(self, where: Positions, caches: list, records: Optional[list[KVRecord]], step: int) -> Positions:
        """``where`` for recursion step ``step``: under KV sharing, the first step keeps its keys and
        values (in ``records`` without a cache: its caches keep them otherwise) and the later ones read them."""
        if not self.shares_kv:
            return where
        if step == 0:
            return where if records is None else replace(where, kv=records)
        sources = records if records is not None else caches[0].blocks
        return replace(where, kv=[SharedKV(source) for source in sources])

    def _stack_update(self, x, where, routing, cache):
        return self.stack(x, where, routing, cache, residual=False)

    def forward(
        self,
        x: torch.Tensor,
        where: Positions,
        routing: Routing = Routing.TOPK,
        cache: Optional[list[StackCache]] = None,
    ) -> tuple[torch.Tensor, Optional[RecursionInfo]]:
        caches = cache if cache is not None else [None] * self.cfg.recursions
        records = None
        if self.shares_kv and cache is None:  # whole sequences: keep the first step's keys, with their positions
            records = [KVRecord() for _ in self.stack.blocks]
            if where.index is None:
                B, T = x.shape[:2]
                where = replace(where, index=torch.arange(T, device=x.device).expand(B, T))
        if self.depth_router is not None:
            return self._token_choice(x, where, routing, caches, records)
        if not self.steps:  # dense recursion: every token, every step
            for r, step_cache in enumerate(caches):
                x, _ = self.stack(x, self.step_positions(where, caches, records, r), routing, step_cache)
            return x, None
        if where.policy is not None:  # one token per row: each step decides among the rows the step before kept
            eligible = None
            for r, (router, step_cache) in enumerate(zip(self.steps, caches)):
                at = self.step_positions(where, caches, records, r)
                logits, keep = router.keep(x, at, step_cache.decision, eligible)
                x = update_rows(self._stack_update, x, keep, router.weight_of(logits), at, step_cache)
                step_cache.count(keep)
                eligible = keep.unsqueeze(1)
            return x, None
        infos, eligible = [], None
        for r, (router, step_cache) in enumerate(zip(self.steps, caches)):
            at = self.step_positions(where, caches, records, r)
            state = None if step_cache is None else step_cache.decision
            choice = router.choose(x, at, routing, state, whole=step_cache is None, eligible=eligible)
            x, _ = update_picked(
                self._stack_update, x, router.weight_of(choice.r), choice.picks, choice.n_real, at, step_cache, routing
            )
            info = router.report(choice, routing, eligible)
            info.layer = r
            infos.append(info)
            if step_cache is not None:
                step_cache.count(info.selected.sum(dim=1))
            eligible = info.selected
        return x, RecursionInfo(infos)

    # --- token choice ------------------------------------------------------------------------------
    def depths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's depth (B, T), 1 .. N_r, and the router's probabilities (B, T, N_r), in fp32."""
        with full_precision(x.device.type):
            probs = F.linear(x.float(), self.depth_router.weight.float()).softmax(dim=-1)
        return probs.argmax(dim=-1) + 1, probs

    def _token_choice(
        self, x, where: Positions, routing: Routing, caches: list, records
    ) -> tuple[torch.Tensor, Optional[RecursionInfo]]:
        depth, probs = self.depths(x)
        gate = probs.gather(-1, (depth - 1).unsqueeze(-1)).squeeze(-1)  # the chosen depth's probability
        if where.policy is not None:  # one token per row
            real = None if where.n_real is None else where.n_real > 0
            for r, step_cache in enumerate(caches):
                keep = depth[:, 0] > r if real is None else (depth[:, 0] > r) & real
                x = update_rows(
                    self._stack_update, x, keep, gate, self.step_positions(where, caches, records, r), step_cache
                )
                step_cache.count(keep)
            return x, None
        T = x.size(1)
        valid = where.valid(T)
        infos, taken = [], valid
        for r, step_cache in enumerate(caches):
            wants = depth > r if taken is None else (depth > r) & taken
            if routing == Routing.TOPK:  # training: the step's slots, filled in temporal order (static shapes)
                slots = self.cfg.token_choice_slots(T, r)
                selected = wants & (wants.cumsum(dim=1) <= slots)
                picks, n_real = pack_selected(selected, k=slots)
            else:  # causal: every token its depth asks for
                selected = wants
                picks, n_real = pack_selected(selected)
            x, _ = update_picked(
                self._stack_update,
                x,
                gate,
                picks,
                n_real,
                self.step_positions(where, caches, records, r),
                step_cache,
                routing,
            )
            if step_cache is not None:
                step_cache.count(selected.sum(dim=1))
            infos.append(
                RoutingInfo(
                    layer=r,
                    selected=selected,
                    router_logits=gate.detach(),
                    predictor_logits=None,
                    topk=None,
                    aux_losses={},
                    aux_loss=gate.new_zeros(()),
                    causal=routing == Routing.CAUSAL,
                    eligible=taken,
                )
            )
            taken = selected
        balance = self.balance_loss(depth, probs, valid)
        return x, RecursionInfo(
            infos, balance=self.cfg.recursion_balance_weight * balance, balance_loss=balance.detach()
        )

    def balance_loss(self, depth: torch.Tensor, probs: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """``N_r * sum_d f_d * P_d``: f_d the share of (real) tokens given depth d, P_d the router's mean
        probability of d; 1 when every depth gets its share, larger as the router concentrates."""
        n = self.cfg.recursions
        weight = torch.ones_like(depth, dtype=probs.dtype) if valid is None else valid.to(probs.dtype)
        total = weight.sum().clamp(min=1)
        share = (F.one_hot(depth - 1, n).to(probs.dtype) * weight.unsqueeze(-1)).sum(dim=(0, 1)) / total
        mean_prob = (probs * weight.unsqueeze(-1)).sum(dim=(0, 1)) / total
        return n * (share * mean_prob).sum()
