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
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .layers import Block, CacheWrite

Routing = Literal["topk", "causal"]


@dataclass
class RoutingInfo:
    """What one routed block did in a forward pass (tensors are detached views for telemetry)."""

    layer: int
    """Index of the block in the model."""
    selected: torch.Tensor
    """(B, T) bool: tokens the block processed."""
    router_logits: torch.Tensor
    """(B, T) float32: router scores ``r``."""
    predictor_logits: Optional[torch.Tensor]
    """(B, T) float32 logits of the causal predictor, or None without one."""
    topk: Optional[torch.Tensor]
    """(B, T) bool: top-k membership of the router logits (the causal decision's target); None
    during incremental decoding, where the rest of the sequence is not known."""
    aux_losses: dict[str, torch.Tensor]
    """Unweighted auxiliary losses of this block by name (``router_bce``, ``predictor_bce``)."""


_AUTOCAST_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))
"""Device types with an autocast mode; looked up once here, because ``torch.amp.is_autocast_available``
inside ``forward`` is opaque to ``torch.compile`` and broke the graph at every routed block."""


def _full_precision(device_type: str):
    """Context that turns autocast off (a no-op where it is off), so router scores are ranked in
    fp32; devices without autocast (the meta device ``measure_flops`` uses) get a null context."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def causal_logits(router_logits: torch.Tensor, predictor_logits: Optional[torch.Tensor]) -> torch.Tensor:
    """What causal routing thresholds at 0 (``sigmoid > 0.5``): the predictor's logits when the
    block has a predictor, else the router's."""
    return predictor_logits if predictor_logits is not None else router_logits


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for (B, T, C) ``x`` and (B, k) ``idx`` -> (B, k, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the positions of the ``k`` largest scores, sorted into temporal order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def causal_indices(decision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack per-row selections of different sizes into one (B, k_max) index tensor.

    Returns ``(idx, valid)``: each row lists its selected positions in temporal order, then
    unselected positions as padding (``valid`` False). Padding always comes after every real
    token, so with a causal mask no real token attends to it.
    """
    counts = decision.sum(dim=1)
    k_max = int(counts.max())
    # A stable sort on "not selected" puts selected positions first, each group in temporal order.
    order = torch.argsort((~decision).to(torch.int8), dim=1, stable=True)[:, :k_max]
    valid = torch.arange(k_max, device=decision.device) < counts.unsqueeze(1)
    return order, valid


class RoutedBlock(nn.Module):
    """A ``Block`` behind a router: ``x_i + w(r_i) * f(X~)_i`` for picked tokens, ``x_i`` otherwise."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.block = Block(cfg)
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        # The predictor reads the router's input through a stop-gradient: it learns to imitate
        # top-k membership causally without changing what the language model learns.
        self.predictor = (
            nn.Sequential(nn.Linear(cfg.d_model, cfg.predictor_hidden), nn.SiLU(), nn.Linear(cfg.predictor_hidden, 1))
            if cfg.causal_method == "predictor"
            else None
        )

    def reset_parameters(self) -> None:
        """Start the predictor at the base rate: sigmoid(bias) = capacity, so before it has learned
        anything it picks about the right number of tokens and its BCE starts at the entropy."""
        if self.predictor is not None:
            # A zero hidden bias keeps the initial output token-dependent (a random one would add
            # the same offset to every token and make the first decisions all-or-nothing).
            nn.init.zeros_(self.predictor[0].bias)
            c = min(self.cfg.capacity, 1 - 1e-3)
            nn.init.constant_(self.predictor[-1].bias, math.log(c / (1 - c)))

    def router_weight(self, r: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(r) if self.cfg.router_weight == "sigmoid" else r

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        routing: Routing = "topk",
        cache: Optional[KVCache] = None,
        positions: Optional[torch.Tensor] = None,
        token_valid: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, RoutingInfo, torch.Tensor]:
        """Returns the new residual stream, what was routed, and this block's weighted aux loss.

        ``cos``/``sin`` are the rope tables of every position of ``x``: (1 or B, T, head_dim/2).
        Incremental decoding passes this block's ``cache``, the tokens' ``positions`` (B, T) and
        ``token_valid`` (B, T), real tokens first in each row; it requires causal routing, and then
        top-k membership and the aux losses, which need the whole sequence, are not computed.
        """
        B, T, _ = x.shape
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing={routing!r} is invalid: must be 'topk' or 'causal'")
        if cache is not None and routing != "causal":
            raise ValueError("a KV cache needs routing='causal': top-k depends on tokens not seen yet")
        with _full_precision(x.device.type):
            r = F.linear(x.float(), self.router.weight.float()).squeeze(-1)
        p = self.predictor(x.detach()).squeeze(-1).float() if self.predictor is not None else None

        topk = None
        if cache is None:
            scores = torch.rand_like(r) if self.cfg.random_routing else r
            topk_idx = topk_indices(scores, self.cfg.capacity_tokens(T))
            topk = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, topk_idx, True)

        if routing == "topk":
            idx, valid, selected = topk_idx, None, topk
        else:
            if self.cfg.random_routing:
                selected = torch.rand_like(r) < self.cfg.capacity
            else:
                selected = causal_logits(r, p) > 0
            if token_valid is not None:
                selected = selected & token_valid
            idx, valid = causal_indices(selected)

        if idx.size(1) > 0:
            write = None
            if cache is not None:
                write = CacheWrite(cache, n_valid=selected.sum(dim=1), positions=positions.gather(1, idx))
            cos_sel = gather_tokens(cos.expand(B, -1, -1), idx)
            sin_sel = gather_tokens(sin.expand(B, -1, -1), idx)
            delta = self.block(gather_tokens(x, idx), cos_sel, sin_sel, write, residual=False)
            weight = self.router_weight(r).gather(1, idx)
            if valid is not None:
                weight = weight * valid
            # scatter_add wants one dtype: the update may be bf16 under autocast, the stream is not.
            contribution = (delta * weight.unsqueeze(-1)).to(x.dtype)
            x = x.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)), contribution)

        aux_losses, aux = self._aux_losses(r, p, topk) if topk is not None else ({}, r.new_zeros(()))
        info = RoutingInfo(
            layer=self.layer,
            selected=selected.detach(),
            router_logits=r.detach(),
            predictor_logits=None if p is None else p.detach(),
            topk=None if topk is None else topk.detach(),
            aux_losses={name: loss.detach() for name, loss in aux_losses.items()},
        )
        return x, info, aux

    def _aux_losses(self, r, p, topk) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """BCE of the causal decision's logits against top-k membership, per row and token."""
        if self.cfg.random_routing:  # membership is noise; there is nothing to learn
            return {}, r.new_zeros(())
        target = topk.to(r.dtype)
        if p is not None:
            loss = F.binary_cross_entropy_with_logits(p, target)
            return {"predictor_bce": loss}, self.cfg.predictor_aux_weight * loss
        loss = F.binary_cross_entropy_with_logits(r, target)
        return {"router_bce": loss}, self.cfg.router_aux_weight * loss
