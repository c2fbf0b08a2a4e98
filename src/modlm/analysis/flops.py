"""Analytic FLOPs of the model: what a step costs, and what MoD saves.

Convention (that of ``torch.utils.flop_counter.FlopCounterMode`` and Lightning's
``measure_flops``): only matrix multiplications count, 2 FLOPs per multiply-add, attention counted
over the full T x T score matrix (not halved for the causal mask). Embedding lookups, norms,
softmax, gathers and scatters count 0. Training is 3x forward (each matmul has two matmuls in its
backward: the input gradient and the weight gradient), less the one input gradient the
stop-gradient predictor does not need.

A routed block runs attention and MLP on ``k`` tokens instead of ``T`` (attention alone with
``route_part="attention"``: its MLP runs on all ``T``); its router (and the causal predictor, if any)
runs on all ``T``.

A mixture-of-experts MLP on ``n`` tokens costs its router (``d -> n_experts + noop_experts``) on
all ``n`` plus one expert MLP per computed pick ("expert passes"). Training computes every slot of
the static capacity, ``n_experts * slots_per_expert(n)``, used or not (that is what the batched
matmuls multiply); inference computes exactly the picks of real experts, ``n * expert_top_k *
n_experts / (n_experts + noop_experts)`` when the router is balanced (no-op picks cost nothing).

A recursive model (``recursions > 1``) costs its unique blocks on all ``T`` tokens plus, per
recursion step, its shared stack on the tokens the step processed (``k`` of its capacity; every
token in a dense recursion) and, with expert choice, the step's router and predictor on all ``T``.
Under recursive KV sharing a later step projects queries only, and they attend over the keys of
the tokens the first step processed. Token choice runs one router (d -> N_r) on all ``T`` tokens
instead of one per step; in training its steps compute their static slots
(``ModelConfig.token_choice_slots``), at inference what the router picked (the metrics' ``ran_forward_flops``
charges what ran).
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

from ..model.config import ModelConfig

__all__ = [
    "attention_flops",
    "block_flops",
    "decode_flops",
    "dense_twin",
    "expert_passes",
    "flops_ratio_vs_dense",
    "forward_flops",
    "mlp_flops",
    "router_flops",
    "training_flops",
]


def mlp_flops(cfg: ModelConfig, n_tokens: float) -> float:
    """Forward FLOPs of the dense MLP (or of one expert) on ``n_tokens`` tokens."""
    mlp_mats = 3 if cfg.mlp == "swiglu" else 2
    return 2 * n_tokens * cfg.d_model * cfg.mlp_hidden * mlp_mats


def expert_passes(cfg: ModelConfig, n_tokens: int, routing: Literal["topk", "causal"] = "topk") -> float:
    """Expert MLP passes a mixture-of-experts MLP computes for one sequence of ``n_tokens`` inputs:
    the static training capacity of every real expert (``"topk"``), or the expected real-expert
    picks of a balanced router at inference (``"causal"``: every pick kept, no-op picks free)."""
    if routing == "topk":
        return cfg.n_experts * cfg.slots_per_expert(n_tokens)
    return n_tokens * cfg.expert_top_k * cfg.n_experts / (cfg.n_experts + cfg.noop_experts)


def attention_flops(
    cfg: ModelConfig, n_tokens: int, attention: Literal["full", "causal"] = "full", shared_keys: Optional[int] = None
) -> float:
    """Forward FLOPs of one attention sublayer on ``n_tokens`` tokens of one sequence: projections, scores
    and values. ``shared_keys``: it computes no keys or values and attends over that many of another pass's
    (recursive KV sharing)."""
    d, n = cfg.d_model, n_tokens
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    keys = n if shared_keys is None else shared_keys
    kv_projection = 2 * kv_width if shared_keys is None else 0
    projections = 2 * n * d * (q_width + kv_projection) + 2 * n * q_width * d  # qkv and output (biases: 0)
    scores_and_values = 2 * (2 * n * keys * q_width)  # q @ k^T and p @ v, all query heads together
    if attention == "causal":
        scores_and_values //= 2
    return projections + scores_and_values


def mlp_sublayer_flops(cfg: ModelConfig, n_tokens: int, experts: bool = False, passes: Optional[float] = None) -> float:
    """Forward FLOPs of one MLP sublayer on ``n_tokens`` tokens: the dense MLP, or with ``experts`` a
    mixture (router on every token, one expert MLP per pass; ``passes`` defaults to the training capacity,
    ``expert_passes(cfg, n_tokens)``)."""
    if not experts:
        return mlp_flops(cfg, n_tokens)
    if passes is None:
        passes = expert_passes(cfg, n_tokens)
    return 2 * n_tokens * cfg.d_model * (cfg.n_experts + cfg.noop_experts) + mlp_flops(cfg, passes)


def block_flops(
    cfg: ModelConfig,
    n_tokens: int,
    attention: Literal["full", "causal"] = "full",
    *,
    experts: bool = False,
    passes: Optional[float] = None,
    shared_keys: Optional[int] = None,
) -> float:
    """Forward FLOPs of one transformer block run on ``n_tokens`` tokens of one sequence: its attention
    (``attention_flops``) and MLP (``mlp_sublayer_flops``) sublayers."""
    return attention_flops(cfg, n_tokens, attention, shared_keys) + mlp_sublayer_flops(cfg, n_tokens, experts, passes)


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
    passes_per_expert_layer: Optional[Sequence[float]] = None,
    tokens_per_recursion_step: Optional[Sequence[float]] = None,
    attention: Literal["full", "causal"] = "full",
) -> int:
    """Forward FLOPs of one sequence of ``seq_len`` tokens.

    ``tokens_per_routed_block`` overrides ``k`` per routed block (e.g. the mean count actually
    processed in causal mode, or a capacity schedule's step); by default each processes
    ``cfg.topk_tokens(seq_len, its capacity)``.
    ``passes_per_expert_layer`` overrides the expert passes of each mixture-of-experts MLP (in
    ``cfg.expert_layers`` order; e.g. the picks measured at inference); by default each computes
    its training capacity. ``tokens_per_recursion_step`` overrides the tokens each recursion step
    processes (by default ``k`` of its capacity). ``attention="causal"`` halves the score/value
    matmuls, for MFU figures that credit only the work a causal kernel needs; the default matches
    FlopCounterMode.
    """
    if cfg.recursive:
        return _recursive_forward_flops(cfg, seq_len, tokens_per_recursion_step, attention)
    routed = cfg.routed_layers
    if tokens_per_routed_block is None:
        tokens_per_routed_block = [cfg.topk_tokens(seq_len, c) for c in cfg.layer_capacities]
    if len(tokens_per_routed_block) != len(routed):
        raise ValueError(
            f"tokens_per_routed_block has {len(tokens_per_routed_block)} entries, model has {len(routed)} routed blocks"
        )
    routed_tokens = dict(zip(routed, tokens_per_routed_block))
    with_experts = cfg.expert_layers
    if passes_per_expert_layer is None:
        passes_per_expert_layer = [None] * len(with_experts)
    if len(passes_per_expert_layer) != len(with_experts):
        raise ValueError(
            f"passes_per_expert_layer has {len(passes_per_expert_layer)} entries, model has "
            f"{len(with_experts)} mixture-of-experts MLPs"
        )
    passes = dict(zip(with_experts, passes_per_expert_layer))

    total = 0.0
    attention_only = cfg.route_part == "attention"
    for layer in range(cfg.n_layers):
        mlp = dict(experts=layer in passes, passes=passes.get(layer))
        if layer in routed_tokens and attention_only:  # the picks attend; every token runs the MLP
            total += (
                attention_flops(cfg, routed_tokens[layer], attention)
                + mlp_sublayer_flops(cfg, seq_len, **mlp)
                + router_flops(cfg, seq_len)
            )
        elif layer in routed_tokens:
            total += block_flops(cfg, routed_tokens[layer], attention, **mlp) + router_flops(cfg, seq_len)
        else:
            total += block_flops(cfg, seq_len, attention, **mlp)
    total += 2 * seq_len * cfg.d_model * cfg.vocab_size  # LM head
    return int(round(total))


def _recursive_forward_flops(
    cfg: ModelConfig, seq_len: int, tokens: Optional[Sequence[float]], attention: Literal["full", "causal"]
) -> int:
    if tokens is None and cfg.recursion_routing == "token_choice":  # training's static slots
        tokens = [cfg.token_choice_slots(seq_len, r) for r in range(cfg.recursions)]
    elif tokens is None:
        tokens = [cfg.topk_tokens(seq_len, c) for c in cfg.step_capacities]
    if len(tokens) != cfg.recursions:
        raise ValueError(
            f"tokens_per_recursion_step has {len(tokens)} entries, model has {cfg.recursions} recursion steps"
        )
    total = 2 * cfg.unique_before * block_flops(cfg, seq_len, attention)
    if cfg.recursion_routing == "token_choice":
        total += 2 * seq_len * cfg.d_model * cfg.recursions
    for step, n in enumerate(tokens):
        shared = tokens[0] if step and cfg.recursion_kv == "shared" else None
        total += cfg.stack_layers * block_flops(cfg, n, attention, shared_keys=shared)
        if step in cfg.routed_steps:
            total += router_flops(cfg, seq_len)
    total += 2 * seq_len * cfg.d_model * cfg.vocab_size  # LM head
    return int(round(total))


def training_flops(cfg: ModelConfig, seq_len: int, **kwargs) -> int:
    """FLOPs of forward + backward for one sequence: 3x forward, less one matmul per predictor.

    The predictor reads a detached input, so its first layer's backward computes the weight
    gradient only; every other matmul computes both gradients.
    """
    flops = 3 * forward_flops(cfg, seq_len, **kwargs)
    if cfg.causal_method == "predictor":
        flops -= cfg.n_deciders * 2 * seq_len * cfg.d_model * cfg.predictor_hidden
    return flops


def decode_flops(cfg: ModelConfig, context: int, share: Optional[float] = None) -> float:
    """Matmul FLOPs of one decoding step of one row: every block on the new token with attention over
    ``context`` cached tokens, routed blocks at ``share`` (the fraction of steps they process; their
    routers and predictors run every step), and the LM head. ``share=None`` (or a dense config):
    every block every step. The bound MoD's decode speed-up is measured against."""
    d, hid = cfg.d_model, cfg.mlp_hidden
    attention = 2 * 4 * d * d + 4 * d * context
    mlp = 2 * (3 if cfg.mlp == "swiglu" else 2) * d * hid
    block = attention + mlp
    n_routed = len(cfg.routed_layers) if share is not None else 0
    routed_part = attention if cfg.route_part == "attention" else block
    routed = n_routed * (router_flops(cfg, 1) + share * routed_part + (block - routed_part)) if n_routed else 0.0
    return (cfg.n_layers - n_routed) * block + routed + 2 * d * cfg.vocab_size


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The same shape with no routing, dense MLPs and no recursion (every block its own): the
    baseline MoD's (and MoE's, and MoR's) costs are measured against."""
    return ModelConfig(
        **{
            **cfg.to_dict(),
            "route_every": 0,
            "route_layers": None,
            "capacities": None,
            "route_part": "block",
            "n_experts": 0,
            "noop_experts": 0,
            "expert_top_k": 1,
            "recursions": 1,
            "recursion_capacities": None,
            "recursion_kv": "recursion_wise",
            "recursion_routing": "expert_choice",
        }
    )


def flops_ratio_vs_dense(cfg: ModelConfig, seq_len: int, **kwargs) -> float:
    """Forward FLOPs of ``cfg`` divided by those of its dense twin (< 1 means MoD saves); ``kwargs``
    as ``forward_flops``'s (e.g. ``tokens_per_routed_block`` of a capacity schedule's step)."""
    return forward_flops(cfg, seq_len, **kwargs) / forward_flops(dense_twin(cfg), seq_len)
