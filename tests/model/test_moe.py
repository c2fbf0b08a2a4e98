"""Invariants of the mixture-of-experts MLP and of both MoDE variants: which tokens each expert
computes, what a no-op pick does, the one-expert reduction to the dense MLP, causality, cached
decoding, row independence, the load-balancing gradient and the FLOPs model."""

import pytest
import torch
import torch.nn.functional as F

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.metrics import dropped_fraction, expert_load, figures, noop_fraction, passes_per_row, tally
from modlm.flops import expert_passes, forward_flops, training_flops
from modlm.model.config import STATIC, DecodePolicy
from modlm.model.generate import generate
from modlm.model.layers import Block
from modlm.model.moe import MixtureOfExperts
from modlm.model.positions import Positions
from tests.helpers import counted_flops
from tests.helpers.models import V, random_tokens, tiny_config, tiny_model

T, D = 24, 32
MOE_DEFAULTS = dict(capacity=ModelConfig.capacity)  # the library's capacity, for the routed blocks here
VARIANTS = {
    "moe": dict(route_every=0, n_experts=4),
    "staged": dict(route_every=2, capacity=0.5, n_experts=4),
    "integrated": dict(route_every=0, n_experts=3, noop_experts=3),
    "top2": dict(route_every=0, n_experts=3, noop_experts=1, expert_top_k=2, mlp="gelu"),
}


def config(**overrides) -> ModelConfig:
    return tiny_config(**{**MOE_DEFAULTS, **overrides})


def build(seed=0, **overrides) -> MoDTransformer:
    return tiny_model(seed, **{**MOE_DEFAULTS, **overrides})


def mixture(seed=0, **overrides) -> MixtureOfExperts:
    torch.manual_seed(seed)
    moe = MixtureOfExperts(config(**overrides), layer=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a spread router: picks differ from token to token
    return moe


def hidden(batch=3, length=T, seed=2) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["host_decides", "static"])
def policy(request) -> DecodePolicy:
    """Decode with routers that read their picks on the host, then with static masked steps."""
    return DecodePolicy(host_decides=True, bounded_reads=True) if request.param == "host_decides" else STATIC


# --- which tokens each expert computes ---------------------------------------------------------------
def test_training_dispatch_gives_each_expert_its_first_picks_in_temporal_order():
    """Training: expert e's slots of row b hold exactly the tokens of b that picked e, earliest
    first, up to its capacity; the rest of the slots are zero and later picks are dropped."""
    moe = mixture(n_experts=3, noop_experts=1, capacity_factor=0.75)
    x = hidden()
    seen = []
    original = moe.up.forward
    moe.up.forward = lambda buf: (seen.append(buf.detach().clone()), original(buf))[1]
    y, info = moe(x, "topk")
    (buf,) = seen
    B, C = x.size(0), info.slots_per_expert
    assert C == moe.cfg.slots_per_expert(T) == 5 and buf.shape == (3, B * C, D)
    for e in range(3):
        for b in range(B):
            mine = (info.expert[b, :, 0] == e).nonzero().flatten()
            kept = mine[:C]
            slots = buf[e, b * C : (b + 1) * C]
            assert torch.equal(slots[: len(kept)], x[b, kept])
            assert (slots[len(kept) :] == 0).all()
            assert torch.equal(
                info.computed[b, :, 0].nonzero().flatten()[info.expert[b, info.computed[b, :, 0], 0] == e], kept
            )
    assert dropped_fraction(info) > 0, "the test needs picks over capacity"
    dropped_or_noop = ~info.computed[..., 0]
    assert (y[dropped_or_noop] == 0).all() and (y[~dropped_or_noop] != 0).all()


def test_inference_gives_each_expert_exactly_its_tokens_and_drops_nothing():
    moe = mixture(n_experts=3, noop_experts=2)
    x = hidden()
    calls = []
    original = moe.up.one
    moe.up.one = lambda e, v: (calls.append((e, v.detach().clone())), original(e, v))[1]
    y, info = moe(x, "causal")
    flat, picks = x.reshape(-1, D), info.expert.reshape(-1)
    assert sorted(e for e, _ in calls) == [e for e in range(3) if (picks == e).any()]  # one call per busy expert
    for e, rows in calls:
        assert torch.equal(rows, flat[picks == e]), f"expert {e} must see its tokens only, in order"
    assert info.slots_per_expert is None and torch.equal(info.computed, info.expert < 3) and dropped_fraction(info) == 0
    assert sum(len(rows) for _, rows in calls) == int((picks < 3).sum())  # no-op picks cost no expert work


def reference_mixture(moe: MixtureOfExperts, x: torch.Tensor, routing: str) -> torch.Tensor:
    """``y_t = sum_j p_j E_j(x_t)`` token by token, from the definition: ``p`` the softmax of the
    router over real and no-op experts, the sum over the token's ``expert_top_k`` picks (their
    probabilities as they are, not renormalised over the picks), a no-op pick adding nothing and,
    in training routing, a pick counted only while its expert has a free slot in the row (tokens
    claim slots in temporal order)."""
    cfg = moe.cfg
    E = cfg.n_experts
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)

    def expert(e, v):
        if moe.gated:
            return moe.down.weight[e] @ (F.silu(moe.gate.weight[e] @ v) * (moe.up.weight[e] @ v))
        return moe.down.weight[e] @ F.gelu(moe.up.weight[e] @ v)

    rows = []
    for b in range(x.size(0)):
        used = [0] * E
        tokens_out = []
        for t in range(x.size(1)):
            y = torch.zeros(x.size(-1))
            for e in probs[b, t].topk(cfg.expert_top_k).indices.tolist():
                if e >= E:
                    continue  # a no-op expert
                if routing == "topk":
                    if used[e] == cfg.slots_per_expert(x.size(1)):
                        continue  # dropped: the expert's slots are taken by earlier tokens
                    used[e] += 1
                y = y + probs[b, t, e] * expert(e, x[b, t])
            tokens_out.append(y)
        rows.append(torch.stack(tokens_out))
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["topk", "causal", "static step"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_mixture_output_and_router_gradient_follow_the_definition(path, mlp):
    """The module's output equals the per-token definition on every path (training capacity,
    inference grouping, the static one-token step), and so does the router's gradient: the gate
    is the router's probability, on the gradient path."""
    moe = mixture(n_experts=3, noop_experts=2, expert_top_k=2, capacity_factor=0.6, mlp=mlp)
    x = hidden(batch=2, length=12)
    routing = "topk" if path == "topk" else "causal"
    policy = STATIC if path == "static step" else None
    y, info = moe(x, routing, policy=policy)
    want = reference_mixture(moe, x, routing)
    # the module sums the picks in another order than the definition: fp32 rounding of the sums
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    if routing == "topk":
        assert dropped_fraction(info) > 0, "the test needs picks over capacity"
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (got,) = torch.autograd.grad((y * probe).sum(), moe.router.weight)
    (expected,) = torch.autograd.grad((want * probe).sum(), moe.router.weight)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@torch.no_grad()
def test_a_static_decoding_step_reads_the_expert_weights_in_place():
    """The static one-token path (compiled decoding, accelerators) makes no tensor as large as one
    expert matrix: each pick's weights are not gathered (that copied a (B * k, out, in) slice of
    every matrix per step). Every tensor each aten operator makes is watched (views not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    made = []

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            read = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            made.extend(
                (t.numel(), str(func))
                for t in tree_leaves(out)  # views of an input are no copy
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in read
            )
            return out

    moe = mixture(n_experts=4, noop_experts=1, expert_top_k=2)
    x = hidden(batch=4, length=1)
    with Outputs():
        y, _ = moe(x, "causal", policy=STATIC)
    assert made, "the test must see the step's operators"
    assert max(made)[0] < moe.up.weight[0].numel(), max(made)
    torch.testing.assert_close(y, reference_mixture(moe, x, "causal"), rtol=0, atol=1e-5 * float(y.abs().max()))


@pytest.mark.parametrize("variant", ["moe", "staged", "top2"])
def test_expert_routers_learn_from_the_language_model_loss_alone(variant):
    """With the load-balancing weight at 0 the gate is the routers' only way to the loss: every
    mixture's router gets a gradient from the next-token loss."""
    model = build(**VARIANTS[variant], moe_aux_weight=0.0).train()
    mixtures = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    assert len(mixtures) == model.config.n_layers
    for moe in mixtures:
        torch.nn.init.normal_(moe.router.weight, std=0.3)
    idx = random_tokens(3, T)
    out = model(idx[:, :-1], "topk", targets=idx[:, 1:])
    assert all(info.aux_loss.item() == 0 for info in out.experts)
    out.loss.backward()
    for moe in mixtures:
        grad = moe.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"block {moe.layer}"


# --- no-op experts, one expert, the dense MLP ---------------------------------------------------------
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_noop_pick_leaves_the_mlp_untouched(routing):
    moe = mixture(n_experts=2, noop_experts=2, capacity_factor=4.0)
    x = hidden()
    y, info = moe(x, routing)
    noop = info.expert[..., 0] >= 2
    assert noop.any() and (~noop).any()
    assert (y[noop] == 0).all() and (y[~noop] != 0).all()
    # in a block, the token keeps exactly its stream plus attention
    torch.manual_seed(0)
    block = Block(config(n_experts=2, noop_experts=2, capacity_factor=4.0), layer=0)
    block.mlp.load_state_dict(moe.state_dict())
    where = Positions.sequence(block.mlp.cfg, T)
    out, binfo = block(x, where, routing)
    a = block.attn(block.attn_norm(x), where)
    skipped = binfo.expert[..., 0] >= 2
    assert skipped.any() and torch.equal(out[skipped], (x + a)[skipped])


@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_one_expert_without_noop_equals_the_dense_model(routing, mlp):
    dense = build(route_every=2, mlp=mlp)
    moe = build(route_every=2, mlp=mlp, n_experts=1, capacity_factor=1.0)
    state = {k: (v.unsqueeze(0) if ".mlp." in k else v) for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert all(k.endswith("mlp.router.weight") for k in missing) and not unexpected
    idx = random_tokens(3, T)
    torch.testing.assert_close(moe(idx, routing).logits, dense(idx, routing).logits, rtol=0, atol=1e-5)
    assert all((info.computed == 1).all() for info in moe(idx, routing).experts)


# --- causality, caching, rows ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_routing_is_causal(variant):
    model = build(**VARIANTS[variant])
    idx = random_tokens(3, T)
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % V
    a, b = model(idx, "causal").logits, model(changed, "causal").logits
    # (each expert multiplies the tokens that picked it: a matmul over another number of rows may
    # round differently in the last bit, hence the tolerance)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("variant", ["moe", "integrated", "top2"])
def test_training_capacity_is_causal_without_routed_blocks(variant):
    """Picks fill each expert's slots in temporal order, so what is dropped depends on earlier
    tokens only: without routed blocks the training forward is causal too."""
    model = build(**VARIANTS[variant], capacity_factor=0.6)
    idx = random_tokens(3, T)
    out = model(idx, "topk")
    assert any(dropped_fraction(info) > 0 for info in out.experts), "the test needs drops"
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % V
    torch.testing.assert_close(model(changed, "topk").logits[:, :15], out.logits[:, :15], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefill", [1, 9])
def test_cached_decoding_equals_causal_forward(variant, prefill, policy):
    model = build(**VARIANTS[variant])
    idx = random_tokens(3, 30)
    full = model(idx, routing="causal")
    assert len(full.experts) >= 2
    state = model.new_state(3)
    steps = [model.prefill(idx[:, :prefill], state)]
    steps += [model.decode_step(idx[:, t], state, policy).unsqueeze(1) for t in range(prefill, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["staged", "integrated"])
def test_ragged_prompts_generate_like_single_prompts_and_trace_whole(variant):
    model = build(**VARIANTS[variant])
    prompts = [random_tokens(1, n, seed=n)[0] for n in (3, 11, 7)]
    together = model.generate(prompts, max_new_tokens=6, temperature=0)
    for prompt, out in zip(prompts, together):
        assert torch.equal(out, model.generate(prompt.unsqueeze(0), max_new_tokens=6, temperature=0)[0])
    torch._dynamo.reset()
    traced = torch.compile(model.decode_step, backend="eager", fullgraph=True, dynamic=False)
    compiled = generate(model, prompts, 6, temperature=0, decode_step=lambda t, s: traced(t, s))
    for a, b in zip(compiled, together):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_rows_are_independent(variant, routing):
    """Capacity is per row: a row's picks and outputs do not depend on the rest of the batch."""
    model = build(**VARIANTS[variant], capacity_factor=0.75)
    idx = random_tokens(4, T)
    together = model(idx, routing).logits
    for b in range(4):
        torch.testing.assert_close(model(idx[b : b + 1], routing).logits[0], together[b], rtol=0, atol=1e-5)


# --- the load-balancing loss -------------------------------------------------------------------------
def test_load_balancing_loss_is_one_when_balanced_and_trains_the_router():
    moe = mixture(n_experts=3, noop_experts=1)
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities: P_e = 1/4, shares sum to 1
    _, info = moe(hidden(), "topk")
    assert info.load_balance.item() == pytest.approx(1.0, abs=1e-6)
    moe = mixture(n_experts=3, noop_experts=1)
    _, info = moe(hidden(), "topk")
    info.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0  # through the mean router probabilities
    assert moe.up.weight.grad is None and moe.down.weight.grad is None  # the loss is the router's alone
    model = build(**VARIANTS["integrated"])
    out = model(random_tokens(3, T), "topk")
    out.aux_loss.backward()
    torch.testing.assert_close(out.aux_loss, 0.01 * torch.stack([i.load_balance for i in out.experts]).mean())
    assert all(block.mlp.router.weight.grad.abs().sum() > 0 for block in model.blocks)


def test_staged_aux_loss_adds_routing_and_load_balance():
    model = build(**VARIANTS["staged"]).train()
    out = model(random_tokens(3, T), "topk")
    assert [i.layer for i in out.experts] == [0, 1, 2, 3] and [r.layer for r in out.routing] == [1, 3]
    assert out.routing[0].experts is out.experts[1]  # the routed block's experts saw its k picks
    assert out.experts[1].expert.shape[1] == model.config.topk_tokens(T)
    routing = torch.stack([r.aux_loss for r in out.routing]).mean()
    balance = torch.stack([e.aux_loss for e in out.experts]).mean()
    torch.testing.assert_close(out.aux_loss, routing + balance)


# --- FLOPs -------------------------------------------------------------------------------------------
def counted(cfg: ModelConfig, seq_len: int, backward: bool) -> int:
    return counted_flops(cfg, seq_len, backward, batch=2)


@pytest.mark.parametrize("variant", [*VARIANTS, "every_other"])
@pytest.mark.parametrize("seq_len", [64, 200])
def test_flops_match_flop_counter_exactly(variant, seq_len):
    """The training path's static capacity shapes make the count exact on the meta device."""
    fields = VARIANTS.get(variant, dict(route_every=2, n_experts=2, moe_every=2, capacity_factor=2.0))
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=6, n_heads=4, max_seq_len=256, **fields)
    assert 2 * forward_flops(cfg, seq_len) == counted(cfg, seq_len, backward=False)
    assert 2 * training_flops(cfg, seq_len) == counted(cfg, seq_len, backward=True)


def test_expert_passes_follow_capacity_top_k_and_noop_share():
    cfg = config(n_experts=4, noop_experts=4, expert_top_k=2, capacity_factor=1.25)
    assert cfg.slots_per_expert(512) == 160  # 1.25 * 512 * 2 / 8
    assert expert_passes(cfg, 512) == 4 * 160
    assert expert_passes(cfg, 512, "causal") == 512 * 2 * 4 / 8  # balanced: half the picks are no-ops
    dense = config(route_every=0)
    mlp = 2 * 512 * D * dense.mlp_hidden * 3  # the dense SwiGLU MLP on 512 tokens
    router, slots = 2 * 512 * D * 4, 4 * 160  # 4 experts x ceil(1.25 * 512 / 4) slots
    extra = forward_flops(config(route_every=0, n_experts=4), 512) - forward_flops(dense, 512)
    assert extra == 4 * (router + mlp * slots // 512 - mlp)


# --- telemetry figures -------------------------------------------------------------------------------
def test_expert_figures_by_hand():
    moe = mixture(n_experts=2, noop_experts=1, capacity_factor=0.5)
    x = hidden(batch=2, length=12)
    _, info = moe(x, "topk")
    info.layer = 0  # the model's loop names the block; called alone, the mixture leaves it unnamed
    picks = info.expert[..., 0]
    load = expert_load(info)
    assert load.tolist() == [(picks == e).sum().item() / picks.numel() for e in range(3)]
    assert noop_fraction(info).item() == pytest.approx(float((picks == 2).float().mean()))
    wanted = picks < 2
    assert dropped_fraction(info).item() == pytest.approx(float((wanted & ~info.computed[..., 0]).sum() / wanted.sum()))
    assert passes_per_row(info) == info.computed.sum().item() / 2
    found = figures(tally([info], moe.cfg))["moe"]
    assert [found["load.layer_0.expert_0"], found["load.layer_0.expert_1"]] == pytest.approx(load[:2].tolist())
    assert found["noop_fraction.layer_0"] == pytest.approx(load[2].item())
    assert found["dropped.layer_0"] == pytest.approx(dropped_fraction(info).item())
    assert found["expert_slots.layer_0"] == pytest.approx(passes_per_row(info).item())
    assert set(k.split(".")[0] for k in found) == {"load", "noop_fraction", "dropped", "expert_slots", "load_balance"}
    # padding is neither picked nor counted
    valid = torch.arange(12).unsqueeze(0) < torch.tensor([[12], [5]])
    _, padded = moe(x, "causal", valid=valid)
    assert not padded.computed[1, 5:].any()
    assert expert_load(padded).sum().item() == pytest.approx(1.0)


def test_config_errors_are_one_line():
    for fields, field in [
        (dict(noop_experts=2), "noop_experts"),
        (dict(n_experts=2, expert_top_k=3), "expert_top_k"),
        (dict(n_experts=2, capacity_factor=0), "capacity_factor"),
        (dict(n_experts=-1), "n_experts"),
        (dict(n_experts=2, moe_every=9), "moe_every"),
    ]:
        with pytest.raises(ValueError, match=f"ModelConfig.{field}=") as err:
            config(**fields)
        assert "\n" not in str(err.value)
    assert config(n_experts=4, moe_every=2).expert_layers == [1, 3]
    assert config(n_experts=0).expert_layers == [] and not config(route_every=0).routes_tokens
    assert config(route_every=0, n_experts=2).routes_tokens
