"""The analytic FLOPs model agrees exactly with torch's FlopCounterMode (the count Lightning uses).

Every figure compared here is exact: a top-k pass has static shapes (k tokens per routed block, the
static slots of every expert), and a causal pass is charged at what its padded batches held. The
model's two documented estimates are not counts and are not compared with one: ``attention="causal"``
credits half the score matrix, and ``expert_passes(..., "causal")`` assumes a balanced router.
"""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.flops import dense_twin, flops_ratio_vs_dense, forward_flops, training_flops
from tests.helpers import counted_flops

BATCH = 2


def counted(cfg: ModelConfig, seq_len: int, backward: bool) -> int:
    return counted_flops(cfg, seq_len, backward, batch=BATCH)


GRID = [
    dict(route_every=0),
    dict(route_every=2, capacity=0.125),
    dict(route_every=2, capacity=0.5, mlp="gelu"),
    dict(route_every=1, capacity=0.25, causal_method="router"),
    dict(route_every=3, capacity=0.3, causal_method="predictor", tie_embeddings=False),
    # pretrained shapes: grouped-query attention, heads of their own width, query/key/value biases
    dict(route_every=0, n_kv_heads=2, head_size=32, qkv_bias=True),
    dict(route_every=2, capacity=0.25, n_kv_heads=1),
    # per-block capacities, explicit or spread with depth
    dict(route_layers=[1, 2, 5], capacities=[0.5, 0.25, 0.125]),
    dict(route_every=1, capacity=0.25, capacity_depth=0.5),
    # recursions: each sharing scheme, expert choice with either causal method, the dense recursion
    dict(route_every=0, recursions=3, recursion_sharing="cycle"),
    dict(route_every=0, recursions=2),
    dict(route_every=0, recursions=2, recursion_routing="dense"),
    dict(route_every=0, recursions=4, causal_method="router", recursion_capacities=[0.5, 0.5, 0.25, 0.125]),
    dict(route_every=0, recursions=2, recursion_kv="shared", recursion_capacities=[0.75, 0.5], n_kv_heads=2),
    dict(route_every=0, recursions=3, recursion_sharing="cycle", recursion_routing="dense", recursion_kv="shared"),
    # token choice trains with static slots per step: a meta-device pass runs, with no host read
    dict(route_every=0, recursions=3, recursion_sharing="cycle", recursion_routing="token_choice"),
    dict(route_every=0, recursions=2, recursion_routing="token_choice", recursion_kv="shared", capacity_factor=1.0),
    # attention-only routing: the picks attend, every token runs the MLP
    dict(route_every=2, capacity=0.25, route_part="attention"),
    dict(route_every=1, capacity=0.5, route_part="attention", n_kv_heads=2, n_experts=2),
]


@pytest.mark.parametrize("overrides", GRID)
@pytest.mark.parametrize("seq_len", [64, 200])
def test_forward_and_training_flops_match_flop_counter(overrides, seq_len):
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=6, n_heads=4, max_seq_len=256, **overrides)
    assert BATCH * forward_flops(cfg, seq_len) == counted(cfg, seq_len, backward=False)
    assert BATCH * training_flops(cfg, seq_len) == counted(cfg, seq_len, backward=True)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(route_every=2, capacity=0.5),
        dict(route_every=1, capacity=0.3, causal_method="router"),
        dict(route_every=2, capacity=0.5, n_experts=4, noop_experts=1, expert_top_k=2),
        dict(route_every=0, n_experts=3, noop_experts=3),
        dict(route_every=0, recursions=2, recursion_capacities=[0.75, 0.5]),
        dict(route_every=0, recursions=4, recursion_sharing="cycle", causal_method="router"),
        dict(route_every=0, recursions=2, recursion_kv="shared"),
        dict(route_every=0, recursions=2, recursion_sharing="cycle", recursion_routing="token_choice", init_std=0.3),
        dict(route_every=2, capacity=0.5, route_part="attention"),
    ],
    ids=[
        "mod",
        "mod-router",
        "staged-mode",
        "integrated-mode",
        "mor",
        "mor-cycle-router",
        "mor-shared-kv",
        "mor-token-choice",
        "attention-only",
    ],
)
def test_a_causal_pass_costs_what_ran_forward_flops_charges(overrides):
    """A causal pass (validation's second pass, evaluation) on real tensors: each routed block at
    the most tokens any row picked, each mixture at the picks it computed. SDPA's math backend
    runs attention as matmuls FlopCounterMode counts (its fused CPU kernel is not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from modlm.analysis.metrics import ran_forward_flops

    torch.manual_seed(0)
    # the plain decision: an untrained model's picks are then far from top-k's k
    cfg = ModelConfig(
        vocab_size=100, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, causal_decision="plain", **overrides
    )
    model = MoDTransformer(cfg).eval()
    idx = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        out = model(idx, routing="causal")
    charged = ran_forward_flops(cfg, 40, out.mixtures)
    assert 3 * charged == counter.get_total_flops()
    assert charged != forward_flops(cfg, 40), "the causal pass must differ from the top-k one"


def test_causal_attention_variant_halves_only_attention():
    cfg = ModelConfig(route_every=0)
    full, causal = forward_flops(cfg, 512), forward_flops(cfg, 512, attention="causal")
    assert full - causal == cfg.n_layers * 2 * 512 * 512 * cfg.d_model


def test_a_recursive_model_costs_its_plain_twin_at_full_depth():
    """A dense recursion runs every block of its depth on every token: the plain model's FLOPs with
    fewer parameters; expert choice at the default schedule (1, 2/3, 1/3) costs about 2/3 of it."""
    cfg = ModelConfig(route_every=0, recursions=3, n_layers=8)
    dense = ModelConfig(**{**cfg.to_dict(), "recursion_routing": "dense"})
    assert forward_flops(dense, 512) == forward_flops(dense_twin(cfg), 512)
    assert dense_twin(cfg).recursions == 1
    assert 0.6 < flops_ratio_vs_dense(cfg, 512) < 0.8
    assert forward_flops(cfg, 512, tokens_per_recursion_step=[512] * 3) > forward_flops(dense, 512)  # routers on top
    with pytest.raises(ValueError, match="recursion steps"):
        forward_flops(cfg, 512, tokens_per_recursion_step=[512])


def test_mod_saves_flops_and_actual_counts_override_k():
    cfg = ModelConfig()
    assert 0.5 < flops_ratio_vs_dense(cfg, 512) < 0.7
    assert dense_twin(cfg).route_every == 0 and dense_twin(cfg).d_model == cfg.d_model
    every_token = forward_flops(cfg, 512, tokens_per_routed_block=[512] * 3)
    assert every_token > forward_flops(dense_twin(cfg), 512)  # full routing costs the routers on top
    with pytest.raises(ValueError, match="routed blocks"):
        forward_flops(cfg, 512, tokens_per_routed_block=[64])
