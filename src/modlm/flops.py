"""Analytic FLOPs of the model: what a step costs, and what MoD saves.

Convention (that of ``torch.utils.flop_counter.FlopCounterMode`` and Lightning's
``measure_flops``): only matrix multiplications count, 2 FLOPs per multiply-add, attention counted
over the full T x T score matrix (not halved for the causal mask). Embedding lookups, norms,
softmax, gathers and scatters count 0. Training is 3x forward (each matmul has two matmuls in its
backward: the input gradient and the weight gradient), less the one input gradient the
stop-gradient predictor does not need.

A routed block runs attention and MLP on ``k`` tokens instead of ``T``; its router (and the causal
predictor, if any) runs on all ``T``.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

from .config import ModelConfig


def block_flops(cfg: ModelConfig, n_tokens: int, attention: Literal["full", "causal"] = "full") -> int:
    """Forward FLOPs of one transformer block run on ``n_tokens`` tokens of one sequence."""
    d, n = cfg.d_model, n_tokens
    projections = 2 * n * d * (3 * d) + 2 * n * d * d  # qkv and output
    scores_and_values = 2 * (2 * n * n * d)  # q @ k^T and p @ v, all heads together
    if attention == "causal":
        scores_and_values //= 2
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    mlp = 2 * n * d * cfg.mlp_hidden * mlp_mats
    return projections + scores_and_values + mlp


def router_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Router (d -> 1) and, with ``causal_method="predictor"``, the predictor MLP, on all tokens."""
    flops = 2 * seq_len * cfg.d_model
    if cfg.causal_method == "predictor":
        h = cfg.predictor_hidden
        flops += 2 * seq_len * (cfg.d_model * h + h)
    return flops


def forward_flops(
    cfg: ModelConfig,
    seq_len: int,
    *,
    tokens_per_routed_block: Optional[Sequence[float]] = None,
    attention: Literal["full", "causal"] = "full",
) -> int:
    """Forward FLOPs of one sequence of ``seq_len`` tokens.

    ``tokens_per_routed_block`` overrides ``k`` per routed block (e.g. the mean count actually
    processed in causal mode); by default each processes ``cfg.capacity_tokens(seq_len)``.
    ``attention="causal"`` halves the score/value matmuls, for MFU figures that credit only the
    work a causal kernel needs; the default matches FlopCounterMode.
    """
    routed = cfg.routed_layers
    if tokens_per_routed_block is None:
        tokens_per_routed_block = [cfg.capacity_tokens(seq_len)] * len(routed)
    if len(tokens_per_routed_block) != len(routed):
        raise ValueError(f"tokens_per_routed_block has {len(tokens_per_routed_block)} entries, model has {len(routed)} routed blocks")
    routed_tokens = dict(zip(routed, tokens_per_routed_block))

    total = 0.0
    for layer in range(cfg.n_layers):
        if layer in routed_tokens:
            total += block_flops(cfg, routed_tokens[layer], attention) + router_flops(cfg, seq_len)
        else:
            total += block_flops(cfg, seq_len, attention)
    total += 2 * seq_len * cfg.d_model * cfg.vocab_size  # LM head
    return int(round(total))


def training_flops(cfg: ModelConfig, seq_len: int, **kwargs) -> int:
    """FLOPs of forward + backward for one sequence: 3x forward, less one matmul per predictor.

    The predictor reads a detached input, so its first layer's backward computes the weight
    gradient only; every other matmul computes both gradients.
    """
    flops = 3 * forward_flops(cfg, seq_len, **kwargs)
    if cfg.causal_method == "predictor":
        flops -= len(cfg.routed_layers) * 2 * seq_len * cfg.d_model * cfg.predictor_hidden
    return flops


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The same shape with no routing: the baseline MoD's savings are measured against."""
    return ModelConfig(**{**cfg.to_dict(), "route_every": 0})


def flops_ratio_vs_dense(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of ``cfg`` divided by those of its dense twin (< 1 means MoD saves)."""
    return forward_flops(cfg, seq_len) / forward_flops(dense_twin(cfg), seq_len)
