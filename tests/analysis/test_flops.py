"""The analytic FLOPs model agrees with torch's FlopCounterMode (the count Lightning uses)."""
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
]


@pytest.mark.parametrize("overrides", GRID)
@pytest.mark.parametrize("seq_len", [64, 200])
def test_forward_and_training_flops_match_flop_counter(overrides, seq_len):
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=6, n_heads=4, max_seq_len=256, **overrides)
    fwd = counted(cfg, seq_len, backward=False)
    assert abs(BATCH * forward_flops(cfg, seq_len) / fwd - 1) < 0.02
    train = counted(cfg, seq_len, backward=True)
    assert abs(BATCH * training_flops(cfg, seq_len) / train - 1) < 0.02


def test_causal_attention_variant_halves_only_attention():
    cfg = ModelConfig(route_every=0)
    full, causal = forward_flops(cfg, 512), forward_flops(cfg, 512, attention="causal")
    assert full - causal == cfg.n_layers * 2 * 512 * 512 * cfg.d_model


def test_mod_saves_flops_and_actual_counts_override_k():
    cfg = ModelConfig()
    assert 0.5 < flops_ratio_vs_dense(cfg, 512) < 0.7
    assert dense_twin(cfg).route_every == 0 and dense_twin(cfg).d_model == cfg.d_model
    every_token = forward_flops(cfg, 512, tokens_per_routed_block=[512] * 3)
    assert every_token > forward_flops(dense_twin(cfg), 512)  # full routing costs the routers on top
    with pytest.raises(ValueError, match="routed blocks"):
        forward_flops(cfg, 512, tokens_per_routed_block=[64])
