"""The ordinary transformer parts: attention, MLP and the pre-norm block, and their init.

Nothing here knows about Mixture-of-Depths routing. The dense block computes ``x + f(x)``; a routed
block asks for its residual update ``f`` alone (``forward(..., residual=False)``) on the gathered
tokens only (see ``routing.py``). A block's MLP is the dense one or, where
``ModelConfig.has_experts``, a mixture of experts (``moe.py``). Rotary embeddings and ``Positions``
are ``positions.py``'s.

Every block, dense or routed, is called the same way: ``block(x, where, routing, cache)`` and
returns ``(x, info)``, where ``where`` (``Positions``) says where the tokens of ``x`` sit in their
sequences and ``info`` is what the block's routers did: a routed block's ``RoutingInfo``, a plain
block's ``ExpertInfo`` when its MLP is a mixture, else ``None``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, Routing
from .kv_cache import KVCache
from .moe import ExpertInfo, MixtureOfExperts
from .positions import Positions, apply_rope


# --- attention ----------------------------------------------------------------------------------
def fold_query_groups(device: torch.device) -> bool:
    """Whether grouped-query attention under a mask runs with each key/value head's query heads
    folded into its query rows (``masked_attention``) on ``device``, rather than with SDPA's
    ``enable_gqa``.

    On CUDA ``enable_gqa`` reaches only the Flash and math kernels, and Flash takes no mask: every
    masked call (a prompt or a decoding step over a KV cache, a recursion step reading shared keys)
    ran on the math kernel, which materialises (B, H, T, S) fp32 scores. Folded, every head count
    matches, so the memory-efficient kernel, which takes a mask, can run it. On the CPU both ways run
    the same flash kernel and ``enable_gqa`` stays: folded, prompts took 4-8% longer there and
    decoding steps the same within noise (``bench/gqa_prefill.py``). Not run on a GPU yet: which
    kernel CUDA picks is torch's choice, read from its sources; the GPU session counts it."""
    return device.type == "cuda"


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of (B, H, T, hd) queries over (B, H_kv, S, hd) keys and values under a boolean
    (B, 1, T, S) mask, ``H`` a multiple of ``H_kv`` (query head ``h`` reads key/value head
    ``h // (H / H_kv)``).

    Grouped, on a device where ``fold_query_groups`` says so, the ``g = H / H_kv`` query heads of
    each key/value head become ``g * T`` query rows of one head (rows ``j * T + t``, each under its
    token's mask row): the same attention with equal head counts. Keys and values are read in
    place, once per group; expanding them to ``H`` heads instead would copy the whole cache at
    every step. The (T, S) mask is repeated ``g`` times (a view for one new token)."""
    B, H, T, hd = q.shape
    groups = H // k.size(1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not fold_query_groups(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    rows = q.reshape(B, k.size(1), groups * T, hd)
    mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(2, 3)
    return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask).reshape(B, H, T, hd)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with one fused query/key/value projection: ``n_heads`` query heads and
    ``kv_heads`` key/value heads (grouped-query attention when fewer: query head ``h`` reads
    key/value head ``h // (n_heads / kv_heads)``), ``head_dim`` wide; biases on the fused projection
    with ``qkv_bias``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, where: Positions, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Causal attention over the tokens of ``x`` (B, T, d), in the order given.

        Tokens must be in temporal order; ``where`` carries each token's original position. With
        a ``cache`` the new keys/values are stored first and queries attend to everything cached
        before them in their row.
        """
        B, T, _ = x.shape
        if where.kv is not None and where.kv.reads:
            return self._attend_shared(x, where)
        if self.kv_heads == self.n_heads:
            qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(qkv[:2], where.cos, where.sin)  # queries and keys in one rotation: half the ops
            v = qkv[2]
            groups = {}
        else:
            q, k, v = self.qkv(x).split(
                [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
            )
            q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), where.cos, where.sin)
            k = apply_rope(k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2), where.cos, where.sin)
            v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            groups = {"enable_gqa": True}  # without a mask Flash takes it, on CUDA too
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **groups)
            if where.kv is not None:  # the first recursion step under KV sharing: later steps read these
                where.kv.record(k, v, where.index, where.n_real)
        else:
            k, v, mask = cache.store(k, v, where.index, where.n_real, where.rows, where.span)
            y = masked_attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def _attend_shared(self, x: torch.Tensor, where: Positions) -> torch.Tensor:
        """Queries alone (the query rows of the fused projection), attending over keys and values
        another pass computed (``where.kv``, a ``SharedKV``)."""
        B, T, _ = x.shape
        width = self.n_heads * self.head_dim
        bias = None if self.qkv.bias is None else self.qkv.bias[:width]
        q = F.linear(x, self.qkv.weight[:width], bias).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, where.cos, where.sin)
        k, v, mask = where.kv.read(where.index, where.n_real, where.rows, where.span)
        y = masked_attention(q, k.to(q.dtype), v.to(q.dtype), mask)
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

    def attention_update(self, x: torch.Tensor, where: Positions, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The attention sublayer's update ``attn(norm(x))``."""
        return self.attn(self.attn_norm(x), where, cache)

    def mlp_update(
        self,
        x: torch.Tensor,
        where: Positions,
        routing: Routing = Routing.TOPK,
        cached: bool = False,
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """The MLP sublayer's update ``mlp(norm(x))`` and what its router did (None for the dense MLP);
        ``cached``: the pass extends a KV cache."""
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MixtureOfExperts):
            return self.mlp(h, routing, where.valid(x.size(1)), cached=cached, policy=where.policy)
        return self.mlp(h), None

    def residual_update(
        self,
        x: torch.Tensor,
        where: Positions,
        routing: Routing = Routing.TOPK,
        cache: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """``f(x)`` and what the MLP's router did (None for the dense MLP).

        Returned as a difference built from its two parts (never as ``block(x) - x``), so a routed
        block can scale it by the router weight without cancellation error.
        """
        a = self.attention_update(x, where, cache)
        m, info = self.mlp_update(x + a, where, routing, cached=cache is not None)
        return a + m, info

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """Its KV cache for decoding ``batch_size`` rows of up to ``max_len`` tokens."""
        return KVCache(batch_size, max_len, self.attn.kv_heads, self.attn.head_dim, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        where: Positions,
        routing: Routing = Routing.TOPK,
        cache: Optional[KVCache] = None,
        residual: bool = True,
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """``(x + f(x), info)``, or ``f(x)`` alone with ``residual=False`` (what a routed block asks
        for). The block processes every token; ``routing`` only reaches a mixture-of-experts MLP
        (capacity in training, every pick at inference), whose ``ExpertInfo`` is ``info``.

        Routed blocks call this forward rather than ``residual_update``, so wrappers that work
        through ``forward`` (activation checkpointing) see every call.
        """
        update, info = self.residual_update(x, where, routing, cache)
        return (x + update if residual else update), info


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by depth."""
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue  # norms keep their ones, biases their zeros
        std = (
            residual_std if name.endswith(("attn.proj.weight", "mlp.down.weight")) else cfg.init_std
        )  # expert down matrices are named so too
        nn.init.normal_(p, mean=0.0, std=std)
