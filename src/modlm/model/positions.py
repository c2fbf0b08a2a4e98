"""Where tokens sit in their sequences: rotary position embeddings and ``Positions``.

A routed block runs attention on the tokens it picked, gathered out of their sequences, and a
decoding step runs it on one new token per row; in both cases a token keeps the rotary angle of its
original position. ``Positions`` carries that (and, for passes over a KV cache, what the cache needs)
alongside the tokens of a block's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .config import DecodePolicy, ModelConfig


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` of any shape: returns ``(*positions.shape, head_dim/2)``.

    Computed per forward rather than kept as buffers: it is a few thousand multiplications, it
    works unchanged on the meta device and under FSDP, and it takes arbitrary (gathered or cached)
    positions, which is what routed blocks and the KV cache need. Decoding computes the table of
    every position once per generation and indexes it (``DecodeState``).
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * inverse_frequencies(
        cfg, positions.device
    )  # broadcast, not a matmul
    return angles.cos(), angles.sin()


def inverse_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 rotation speed of each pair of dimensions: ``rope_theta ** (-j / half)``,
    rescaled as Llama 3 does where ``cfg.rope_scaling`` says so (long wavelengths slowed by
    ``factor``, short ones kept, a smooth blend between)."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # 0 where the wavelength is longer than original / low (slowed), 1 where shorter than original / high (kept)
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (..., B, H, T, hd) by per-token angles; ``cos``/``sin`` are (B or 1, T, hd/2).

    Uses the "rotate half" layout: dimension j pairs with j + hd/2.
    """
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def gather_tokens(x: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``x[b, picks[b, j]]`` for (B, T, C) ``x`` and (B, k) ``picks`` -> (B, k, C)."""
    return x.gather(1, picks.unsqueeze(-1).expand(-1, -1, x.size(-1)))


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
    policy: Optional[DecodePolicy] = None
    """Set on one-token decoding steps only (``MoDTransformer.decode_step``): how the step may use
    the host. None: a pass over whole sequences (training, evaluation, a prompt)."""
    kv: Optional[object] = None
    """Recursive KV sharing (``recursion.py``): for a block's attention, a ``KVRecord`` to keep its
    keys and values in, or a ``SharedKV`` to read instead of computing its own; for a shared stack,
    a list of those, one per block (the stack hands each block its own). None: neither."""

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
