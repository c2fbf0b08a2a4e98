"""The ordinary transformer parts: rotary embeddings, attention, MLP and the pre-norm block.

Nothing here knows about Mixture-of-Depths routing. A block's residual update ``f(x)`` is
``update(x, where)``: the dense block computes ``x + f(x)``; a routed block asks for ``f`` alone
(``forward(..., residual=False)``) on the gathered tokens only (see ``routing.py``). A block's MLP
is the dense one or, where ``ModelConfig.has_experts``, a mixture of experts (``moe.py``).

Every block, dense or routed, is called the same way: ``block(x, where, routing, cache)`` and
returns ``(x, info)``, where ``where`` (``Positions``) says where the tokens of ``x`` sit in their
sequences and ``info`` is what the block's routers did: a routed block's ``RoutingInfo``, a plain
block's ``ExpertInfo`` when its MLP is a mixture, else ``None``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .moe import ExpertInfo, MixtureOfExperts


# --- rotary position embedding ------------------------------------------------------------------
def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` of any shape: returns ``(*positions.shape, head_dim/2)``.

    Computed per forward rather than kept as buffers: it is a few thousand multiplications, it
    works unchanged on the meta device and under FSDP, and it takes arbitrary (gathered or cached)
    positions, which is what routed blocks and the KV cache need. Decoding computes the table of
    every position once per generation and indexes it (``DecodeState``).
    """
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # broadcast multiply, not a matmul
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (..., B, H, T, hd) by per-token angles; ``cos``/``sin`` are (B or 1, T, hd/2).

    Uses the "rotate half" layout: dimension j pairs with j + hd/2.
    """
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class Positions:
    """Where the tokens of a block's input (B, T, d) sit in their sequences.

    Without a KV cache only the rotary tables matter. With one, the cache also needs each token's
    original position and which tokens are real: rows may hold padding after their real tokens
    (prompts of different lengths; a routed block's rows pick different counts).
    """

    cos: torch.Tensor
    """(1 or B, T, head_dim/2) rotary tables at each token's original position."""
    sin: torch.Tensor
    index: Optional[torch.Tensor] = None
    """(B, T) original positions (needed to cache keys)."""
    n_real: Optional[torch.Tensor] = None
    """(B,) how many leading tokens of each row are real; None: all of them."""
    rows: Optional[torch.Tensor] = None
    """(B,) the cache rows the input rows belong to, when a decoding step runs a subset of rows;
    None: all rows, in order."""
    span: Optional[int] = None
    """A bound, known to the host, on the cache slots any row fills after this step: attention
    reads only that many slots. None: every slot (static shapes, for ``torch.compile``)."""

    @classmethod
    def sequence(cls, cfg: ModelConfig, length: int, device=None) -> "Positions":
        """Tokens 0..length-1 of every row: the plain forward pass."""
        cos, sin = rope_tables(cfg, torch.arange(length, device=device).unsqueeze(0))
        return cls(cos, sin)

    def valid(self, length: int) -> Optional[torch.Tensor]:
        """(B, length) bool: the real tokens of the block's input; None when all are real."""
        if self.n_real is None:
            return None
        return torch.arange(length, device=self.n_real.device) < self.n_real.unsqueeze(1)

    def gather(self, picks: torch.Tensor, n_real: Optional[torch.Tensor]) -> "Positions":
        """The positions of the tokens at ``picks`` (B, k) of each row, ``n_real`` of them real."""
        B = picks.size(0)
        index = None if self.index is None else self.index.gather(1, picks)
        cos = gather_tokens(self.cos.expand(B, -1, -1), picks)
        sin = gather_tokens(self.sin.expand(B, -1, -1), picks)
        return replace(self, cos=cos, sin=sin, index=index, n_real=n_real)

    def select_rows(self, rows: torch.Tensor) -> "Positions":
        """The positions of a subset of rows whose tokens are all real (a decoding step where only
        some rows do the work)."""
        def pick(t):
            return t if t.size(0) == 1 else t.index_select(0, rows)
        return replace(self, cos=pick(self.cos), sin=pick(self.sin), index=pick(self.index), n_real=None, rows=rows)


def gather_tokens(x: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``x[b, picks[b, j]]`` for (B, T, C) ``x`` and (B, k) ``picks`` -> (B, k, C)."""
    return x.gather(1, picks.unsqueeze(-1).expand(-1, -1, x.size(-1)))


# --- attention ----------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, where: Positions, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Causal attention over the tokens of ``x`` (B, T, d), in the order given.

        Tokens must be in temporal order; ``where`` carries each token's original position. With
        a ``cache`` the new keys/values are stored first and queries attend to everything cached
        before them in their row.
        """
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], where.cos, where.sin)  # queries and keys in one rotation: half the ops
        v = qkv[2]
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask = cache.store(k, v, where.index, where.n_real, where.rows, where.span)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


# --- feed-forward -------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False) if self.gated else None
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


# --- the block ----------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``.

    ``layer`` is the block's index in the model: it decides whether the MLP is a mixture of
    experts (``ModelConfig.has_experts``) and names it in telemetry."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MixtureOfExperts(cfg, layer) if cfg.has_experts(layer) else MLP(cfg)

    def update(self, x: torch.Tensor, where: Positions, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The residual update ``f(x)``: the block computes ``x + f(x)`` (training routing for a
        mixture-of-experts MLP; ``residual_update`` chooses and reports it)."""
        return self.residual_update(x, where, "topk", cache)[0]

    def residual_update(
        self, x: torch.Tensor, where: Positions, routing: str = "topk", cache: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """``f(x)`` and what the MLP's router did (None for the dense MLP).

        Returned as a difference built from its two parts (never as ``block(x) - x``), so a routed
        block can scale it by the router weight without cancellation error.
        """
        a = self.attn(self.attn_norm(x), where, cache)
        h = self.mlp_norm(x + a)
        if isinstance(self.mlp, MixtureOfExperts):
            m, info = self.mlp(h, routing, where.valid(x.size(1)), decoding=cache is not None)
        else:
            m, info = self.mlp(h), None
        return a + m, info

    def forward(
        self, x: torch.Tensor, where: Positions, routing: str = "topk", cache: Optional[KVCache] = None,
        residual: bool = True,
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """``(x + f(x), info)``, or ``f(x)`` alone with ``residual=False`` (what a routed block asks
        for). The block processes every token; ``routing`` only reaches a mixture-of-experts MLP
        (capacity in training, every pick at inference), whose ``ExpertInfo`` is ``info``.

        Routed blocks call this forward rather than ``update`` directly, so wrappers that work
        through ``forward`` (FSDP1 units gathering their shards, activation checkpointing) see
        every call.
        """
        update, info = self.residual_update(x, where, routing, cache)
        return (x + update if residual else update), info


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by depth."""
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue  # norms keep their ones, biases their zeros
        std = residual_std if name.endswith(("attn.proj.weight", "mlp.down.weight")) else cfg.init_std  # expert down matrices are named so too
        nn.init.normal_(p, mean=0.0, std=std)
