"""Attention-only routing (``route_part="attention"``): a routed block's router decides which tokens attend
there and are its keys and values; every token runs the MLP. Everything full-block MoD has, checked against
an independent full-length reference."""

import pytest
import torch
import torch.nn.functional as F

from modlm import ModelConfig, MoDTransformer
from modlm.model.config import STATIC, DecodePolicy
from modlm.model.positions import Positions, apply_rope, rope_tables
from modlm.model.routing import RoutedAttention
from tests.helpers.models import random_tokens, tiny_model

T = 32
ATTENTION_ONLY = dict(route_part="attention", init_std=0.3)  # a larger init spreads the routers' scores


def reference(block: RoutedAttention, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Every token computed at full length: attention whose keys are the selected tokens only (the
    diagonal keeps skipped queries finite), its update kept for selected tokens weighted by w(r), then the
    MLP on every token."""
    cfg, inner = block.cfg, block.block
    B, L, _ = x.shape
    cos, sin = rope_tables(cfg, torch.arange(L).unsqueeze(0))
    q, k, v = inner.attn.qkv(inner.attn_norm(x)).view(B, L, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys = selected[:, None, None, :] | torch.eye(L, dtype=torch.bool)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool).tril() & keys)
    a = inner.attn.proj(y.transpose(1, 2).reshape(B, L, -1))
    w = block.router.weight_of(x @ block.router.weight.squeeze(0))
    h = torch.where(selected.unsqueeze(-1), x + w.unsqueeze(-1) * a, x)
    return h + inner.mlp(inner.mlp_norm(h))


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_the_picks_attend_and_every_token_runs_the_mlp(routing):
    model = tiny_model(**ATTENTION_ONLY, capacity=0.5)
    block = model.blocks[1]
    assert isinstance(block, RoutedAttention)
    x = torch.randn(3, T, 32, generator=torch.Generator().manual_seed(2))
    seen = {}
    block.block.attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("attn", args[0].shape[1]))
    block.block.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("mlp", args[0].shape[1]))
    out, info = block(x, Positions.sequence(block.cfg, T), routing)
    counts = info.selected.sum(dim=1)
    assert (counts > 0).all() and (counts < T).all()
    assert seen == {"attn": int(counts.max()), "mlp": T}
    torch.testing.assert_close(out, reference(block, x, info.selected), rtol=0, atol=1e-5)


def test_zero_routers_at_capacity_one_compute_the_plain_block():
    """The conversion's promise: 2*sigmoid(0) = 1 and every token picked is the pretrained function."""
    routed = tiny_model(**ATTENTION_ONLY, capacity=1.0, router_weight="2sigmoid")
    for router in routed.routers():
        torch.nn.init.zeros_(router.weight)
    dense = MoDTransformer(ModelConfig(**{**routed.config.to_dict(), "route_every": 0, "route_part": "block"})).eval()
    dense.load_state_dict(
        {k.replace(".block.", "."): v for k, v in routed.state_dict().items() if ".router." not in k}, strict=True
    )
    idx = random_tokens(3, T)
    for routing in ("topk", "causal"):
        torch.testing.assert_close(routed(idx, routing=routing).logits, dense(idx).logits, rtol=0, atol=1e-5)


def test_causal_routing_never_reads_a_later_token():
    model = tiny_model(**ATTENTION_ONLY)
    model.calibrate(random_tokens(8, 48, seed=5))
    idx = random_tokens(3, T)
    changed = idx.clone()
    changed[:, 20:] = random_tokens(3, T - 20, seed=9)
    a, b = model(idx, routing="causal"), model(changed, routing="causal")
    torch.testing.assert_close(b.logits[:, :20], a.logits[:, :20], rtol=0, atol=1e-5 * float(a.logits.abs().max()))
    for x, y in zip(a.routing, b.routing):
        assert torch.equal(x.selected[:, :20], y.selected[:, :20])


@pytest.mark.parametrize(
    "policy", [DecodePolicy(host_decides=True, bounded_reads=True), STATIC], ids=["host", "static"]
)
def test_cached_decoding_equals_the_causal_pass_and_caches_only_the_picks(policy):
    model = tiny_model(**ATTENTION_ONLY)
    model.calibrate(random_tokens(8, 48, seed=5))
    idx = random_tokens(3, 40)
    full = model(idx, routing="causal")
    state = model.new_state(3)
    steps = [model.prefill(idx[:, :9], state)]
    steps += [model.decode_step(idx[:, t], state, policy).unsqueeze(1) for t in range(9, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=0, atol=1e-5 * float(full.logits.abs().max()))
    for info in full.routing:  # a skipped token is no key or value of its block
        cache = state.caches[info.layer]
        assert torch.equal(cache.length, info.selected.sum(dim=1))
        for row in range(3):
            n = int(cache.length[row])
            assert torch.equal(cache.positions[row, :n], info.selected[row].nonzero().flatten())
    assert all(int(state.caches[i].length.min()) == 40 for i in (0, 2))  # the dense blocks cache every token


def test_routers_learn_from_the_loss_and_only_the_picks_reach_attention():
    model = tiny_model(**ATTENTION_ONLY).train()
    idx = random_tokens(3, 33)
    model(idx[:, :-1], targets=idx[:, 1:]).loss.backward()
    for router in model.routers():
        assert router.weight.grad.abs().sum() > 0
