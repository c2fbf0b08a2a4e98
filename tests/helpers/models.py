"""The tiny model the model tests share: its config, the model built from a seed, and seeded token ids.

Plain functions rather than fixtures: module-level helpers and ``parametrize`` lists build models and
tokens too, outside any test. A test passes what it needs beyond the shared shape as overrides, so a
module's own defaults (another vocabulary, a shorter context, a larger init) are written where it
builds, not hidden in a helper of its own.
"""

from __future__ import annotations

import torch

from modlm import ModelConfig, MoDTransformer

V = 97  # a prime vocabulary: no tensor dimension of the tiny model is confused with it
TINY = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, capacity=0.25, route_every=2)
"""Four blocks, the second and fourth routed at a quarter of the tokens."""


def tiny_config(**overrides) -> ModelConfig:
    """``TINY`` with ``overrides`` on top."""
    return ModelConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MoDTransformer:
    """``tiny_config(**overrides)``'s model, its weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return MoDTransformer(tiny_config(**overrides)).eval()


def random_tokens(*shape: int, seed: int = 1, vocab: int = V) -> torch.Tensor:
    """Token ids of ``shape`` drawn uniformly below ``vocab`` from a generator of their own (the global
    seed, which ``tiny_model`` sets, is left alone)."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
