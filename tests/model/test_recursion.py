"""Mixture-of-Recursions: a shared stack applied up to N_r times, routed per step.

Each test asserts an exact property on a tiny model with fixed seeds: the sharing schemes compute
what a plain model with the shared weights copied computes; expert choice filters hierarchically
and leaves exited tokens untouched; causal routing never reads a later token; cached decoding
equals the causal forward pass, and each step's caches hold exactly the tokens it processed.
"""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.model.config import STATIC, DecodePolicy
from modlm.model.errors import UserError
from modlm.model.layers import Block
from modlm.model.recursion import Recursion
from modlm.model.routing import update_picked
from tests.helpers.models import random_tokens, tiny_config, tiny_model

# a depth of five blocks, a shared stack in the middle taken up to three times; no MoD blocks
RECURSION = dict(n_layers=5, route_every=0, recursions=3, capacity=ModelConfig.capacity)


def config(**overrides) -> ModelConfig:
    return tiny_config(**{**RECURSION, **overrides})


def build(seed=0, **overrides) -> MoDTransformer:
    return tiny_model(seed, **{**RECURSION, **overrides})


def recursion_of(model) -> Recursion:
    return next(b for b in model.blocks if isinstance(b, Recursion))


# --- structure ------------------------------------------------------------------------------------
def test_sharing_schemes_build_their_unique_blocks():
    cycle = build(recursion_sharing="cycle", n_layers=6)
    assert [type(b) for b in cycle.blocks] == [Recursion] and len(recursion_of(cycle).stack.blocks) == 2
    middle = build(n_layers=8)
    assert [type(b) for b in middle.blocks] == [Block, Recursion, Block] and len(recursion_of(middle).stack.blocks) == 2
    # every parameter has one name: the steps hold the stack without owning it
    names = list(middle.state_dict())
    assert not any(".steps." in n and ".stack." in n for n in names)
    assert len(names) == len(set(p for p in middle.state_dict().values()))  # no tensor saved twice
    dense = build(n_layers=8, recursion_routing="dense")
    assert not any("router" in n or "predictor" in n for n in dense.state_dict())
    block_params = sum(p.numel() for p in middle.blocks[0].parameters())
    # 1 + 2 + 1 unique blocks for a depth of 8, and one router (+ predictor) per step
    step_params = sum(p.numel() for p in recursion_of(middle).steps.parameters())
    assert middle.num_params() == dense.num_params() + step_params
    vanilla = MoDTransformer(ModelConfig(**{**config(n_layers=8).to_dict(), "recursions": 1}))
    assert vanilla.num_params() - dense.num_params() == 4 * block_params


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(recursions=0), "recursions=0"),
        (dict(recursion_sharing="cycle", n_layers=5), "n_layers=5 is invalid: must be a multiple of recursions=3"),
        (dict(n_layers=6), "n_layers=6 is invalid: must be 2 plus a positive multiple"),
        (dict(route_every=2), "route_every=2 is invalid: must be 0"),
        (dict(n_experts=2), "n_experts=2 is invalid"),
        (dict(recursion_capacities=[0.5, 1.0, 0.25]), "recursion_capacities"),
        (dict(recursion_capacities=[1.0, 0.5]), "recursion_capacities"),
        (dict(recursion_sharing="sometimes"), "recursion_sharing"),
        (dict(recursion_routing="token"), "recursion_routing"),
        (dict(recursions=1, recursion_capacities=[1.0]), "recursion_capacities"),
        (dict(recursion_routing="token_choice", recursion_capacities=[1.0, 0.5, 0.25]), "recursion_capacities"),
        (dict(recursion_balance_weight=-1.0), "recursion_balance_weight"),
        (dict(recursions=1, recursion_kv="shared"), "recursion_kv"),
    ],
)
def test_bad_recursion_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        config(**overrides)
    assert "\n" not in str(error.value)


def test_default_schedule_and_shares():
    cfg = config()
    assert cfg.step_capacities == [1.0, 2 / 3, 1 / 3] and cfg.routed_steps == [0, 1, 2] and cfg.n_deciders == 3
    assert config(recursion_routing="dense").step_capacities == [1.0] * 3
    assert config(recursion_routing="dense").routed_steps == [] and not config(recursion_routing="dense").routes_tokens
    model = build(recursion_capacities=[0.5, 0.5, 0.125])
    steps = recursion_of(model).steps
    assert [s.decision.share for s in steps] == [0.5, 1.0, 0.25]
    assert [s.topk_tokens(32) for s in steps] == [16, 16, 4]
    # a step at share 1 keeps, under causal routing too, every token the step before kept
    out = model(random_tokens(3, 32), routing="causal")
    assert torch.equal(out.recursion.steps[1].selected, out.recursion.steps[0].selected)
    assert build()(random_tokens(3, 32), routing="causal").recursion.steps[0].selected.all()


def unrolled(model: MoDTransformer) -> MoDTransformer:
    """The plain model of ``n_layers`` blocks, block i holding a copy of the weights a token meets
    at depth i in ``model`` (a dense recursion)."""
    cfg = model.config
    plain = MoDTransformer(
        ModelConfig(**{**cfg.to_dict(), "recursions": 1, "recursion_routing": "expert_choice"})
    ).eval()
    stack = recursion_of(model).stack.blocks
    order = (
        list(model.blocks[: cfg.unique_before])
        + list(stack) * cfg.recursions
        + list(model.blocks[len(model.blocks) - cfg.unique_before :])
    )
    for target, source in zip(plain.blocks, order, strict=True):
        target.load_state_dict(source.state_dict())
    plain.embed.load_state_dict(model.embed.state_dict())
    plain.norm.load_state_dict(model.norm.state_dict())
    return plain


@pytest.mark.parametrize("sharing, n_layers", [("cycle", 6), ("middle_cycle", 8)])
def test_dense_recursion_is_the_plain_model_with_shared_weights(sharing, n_layers):
    model = build(recursion_sharing=sharing, n_layers=n_layers, recursion_routing="dense", init_std=0.3)
    idx = random_tokens(2, 24)
    torch.testing.assert_close(model(idx).logits, unrolled(model)(idx).logits, rtol=0, atol=1e-5)


def zero_routers(model):
    for step in recursion_of(model).steps:
        torch.nn.init.zeros_(step.weight)
    return model


def test_expert_choice_at_full_capacity_with_neutral_routers_is_the_dense_recursion():
    """Every step picks every token and 2*sigmoid(0) = 1 weighs the stack's update: the dense
    recursion's function, whatever the causal method."""
    routed = zero_routers(build(recursion_capacities=[1.0, 1.0, 1.0], router_weight="2sigmoid", init_std=0.3))
    dense = build(recursion_routing="dense", init_std=0.3)
    dense.load_state_dict(routed.state_dict(), strict=False)
    idx = random_tokens(2, 24)
    torch.testing.assert_close(routed(idx).logits, dense(idx).logits, rtol=0, atol=1e-5)


# --- expert choice --------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_each_step_picks_among_the_tokens_of_the_step_before(routing):
    model = build(recursion_capacities=[0.75, 0.5, 0.25])
    out = model(random_tokens(4, 32), routing=routing)
    steps = out.recursion.steps
    assert [s.layer for s in steps] == [0, 1, 2]
    for before, after in zip(steps, steps[1:]):
        assert not (after.selected & ~before.selected).any(), "a token continued after it exited"
    if routing == "topk":
        assert [s.selected.sum(dim=1).tolist() for s in steps] == [[24] * 4, [16] * 4, [8] * 4]
        for before, after in zip(steps, steps[1:]):
            # the step's top-k among the eligible: its lowest pick beats every eligible token it left
            r = after.router_logits
            lowest = r.masked_fill(~after.selected, float("inf")).min(dim=1).values
            left = r.masked_fill(after.selected | ~before.selected, float("-inf")).max(dim=1).values
            assert (lowest > left).all()
            assert torch.equal(after.topk, after.selected)
    assert torch.equal(out.recursion.depth, torch.stack([s.selected for s in steps]).sum(dim=0))


def test_a_step_leaves_the_tokens_it_does_not_pick_bit_for_bit_unchanged(monkeypatch):
    import modlm.model.recursion as recursion

    model = build(recursion_capacities=[0.75, 0.5, 0.25])
    seen = []

    def recorded(update, x, weight, picks, n_real, *args):  # the stream before and after each step
        out, experts = update_picked(update, x, weight, picks, n_real, *args)
        picked = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, picks, True)
        seen.append((x, out, picked))
        return out, experts

    monkeypatch.setattr(recursion, "update_picked", recorded)
    model(random_tokens(3, 32))
    before, after, selected = seen[1]
    assert torch.equal(after[~selected], before[~selected])
    assert not torch.equal(after[selected], before[selected])


def test_routers_learn_from_the_language_model_loss_and_predictors_from_their_own():
    model = build().train()
    idx = random_tokens(3, 33)
    model(idx[:, :-1], targets=idx[:, 1:]).loss.backward()
    for step in recursion_of(model).steps:
        assert step.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(idx[:, :-1]).aux_loss.backward()
    for name, p in model.named_parameters():
        if ".predictor." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), f"predictor loss leaked into {name}"


def test_the_causal_targets_are_each_steps_membership_among_its_eligible_tokens():
    """The BCE of step r is asked only about the tokens step r - 1 kept: the exited ones (target 0,
    never decided) do not enter its mean."""
    model = build(causal_method="router", recursion_capacities=[0.5, 0.25, 0.125])
    out = model(random_tokens(2, 32))
    for before, step in zip([None] + out.recursion.steps, out.recursion.steps):
        mask = torch.ones_like(step.selected) if before is None else before.selected
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            step.router_logits, step.topk.float(), reduction="none"
        )
        torch.testing.assert_close(step.aux_losses["router_bce"], losses[mask].mean())


# --- causality ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "causal_method, causal_decision, sharing, n_layers",
    [
        ("router", "plain", "cycle", 6),
        ("predictor", "controlled", "middle_cycle", 5),
        ("router", "controlled", "middle_cycle", 5),
        ("predictor", "plain", "cycle", 6),
    ],
)
@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
@torch.no_grad()
def test_causal_routing_never_reads_a_later_token(causal_method, causal_decision, sharing, n_layers, kv):
    model = build(
        causal_method=causal_method,
        causal_decision=causal_decision,
        recursion_sharing=sharing,
        n_layers=n_layers,
        init_std=0.3,
        recursion_kv=kv,
    )
    idx = random_tokens(2, 32)
    t = 20
    changed = idx.clone()
    changed[:, t:] = random_tokens(2, 32 - t, seed=9)
    a, b = model(idx, routing="causal"), model(changed, routing="causal")
    # up to fp32 rounding: rows pack other counts of picks, so matmuls of other shapes sum in another order
    tolerance = 1e-5 * float(a.logits.abs().max())
    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t], rtol=0, atol=tolerance)
    for sa, sb in zip(a.recursion.steps, b.recursion.steps):
        assert torch.equal(sa.selected[:, :t], sb.selected[:, :t])
    assert not torch.allclose(a.logits[:, t:], b.logits[:, t:])
    assert len(a.recursion.depth.unique()) > 1, "the test needs tokens of different depths"
    # the same change moves earlier top-k logits: the check above can see a leak
    top_a, top_b = model(idx, routing="topk"), model(changed, routing="topk")
    assert not torch.allclose(top_a.logits[:, :t], top_b.logits[:, :t], rtol=0, atol=tolerance)


# --- recursion-wise KV caches ---------------------------------------------------------------------
POLICIES = {
    "host_decides": DecodePolicy(host_decides=True, bounded_reads=True),
    "masked": DecodePolicy(host_decides=False, bounded_reads=True),
    "static": STATIC,
}


def decode(model, idx, prefill, policy):
    state = model.new_state(idx.size(0))
    steps = [model.prefill(idx[:, :prefill], state)]
    steps += [model.decode_step(idx[:, t], state, policy).unsqueeze(1) for t in range(prefill, idx.size(1))]
    return torch.cat(steps, dim=1), state


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize(
    "overrides",
    [
        dict(causal_method="predictor"),
        dict(causal_method="router", causal_decision="plain", recursion_sharing="cycle", n_layers=6),
        dict(recursion_capacities=[0.75, 0.5, 0.25], decision_logit="standardized_router"),
        dict(recursion_routing="dense"),
        dict(recursion_kv="shared", recursion_capacities=[0.75, 0.5, 0.25]),
        dict(recursion_kv="shared", causal_method="router", recursion_sharing="cycle", n_layers=6, n_kv_heads=2),
        dict(recursion_kv="shared", recursion_routing="dense"),
        dict(recursion_routing="token_choice"),
        dict(recursion_routing="token_choice", recursion_kv="shared", recursion_sharing="cycle", n_layers=6),
    ],
    ids=[
        "predictor",
        "router-cycle",
        "standardized",
        "dense",
        "shared",
        "shared-router-cycle-gqa",
        "shared-dense",
        "token-choice",
        "token-choice-shared-cycle",
    ],
)
@torch.no_grad()
def test_cached_decoding_equals_the_causal_forward(overrides, policy):
    model = build(init_std=0.3, **overrides)
    idx = random_tokens(3, 40)
    full = model(idx, routing="causal")
    if full.recursion is not None:
        assert len(full.recursion.depth.unique()) > 1, "the test needs tokens of different depths"
    logits, _ = decode(model, idx, 7, POLICIES[policy])
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=1e-5 * float(full.logits.abs().max()))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_each_steps_caches_hold_exactly_the_tokens_it_processed(policy):
    model = build(init_std=0.3, recursion_capacities=[0.75, 0.5, 0.25])
    idx = random_tokens(2, 30)
    full = model(idx, routing="causal")
    _, state = decode(model, idx, 6, POLICIES[policy])
    caches = state.caches[1]  # middle-cycle: unique block, recursion, unique block
    assert len(caches) == 3 and all(len(c.blocks) == model.config.stack_layers for c in caches)
    for step, step_cache in zip(full.recursion.steps, caches):
        for kv in step_cache.blocks:
            for row in range(2):
                n = int(kv.length[row])
                assert torch.equal(kv.positions[row, :n], step.selected[row].nonzero().flatten())
                assert (kv.positions[row, n : kv.max_len] == -1).all()
    assert int(caches[2].blocks[0].length.max()) < int(caches[0].blocks[0].length.min())
    for kv in (state.caches[0], state.caches[2]):
        assert kv.length.tolist() == [30, 30]
    for step, step_cache in zip(full.recursion.steps, caches):  # what each step counts it processed
        assert torch.equal(step_cache.processed, step.selected.sum(dim=1))


def test_calibration_sets_one_threshold_per_step_at_its_share():
    model = build(causal_decision="calibrated", recursion_capacities=[0.75, 0.5, 0.25])
    windows = random_tokens(8, 32, seed=5)
    thresholds = model.calibrate(windows)
    assert thresholds == [float(step.decision.threshold) for step in recursion_of(model).steps]
    out = model(windows, routing="causal")
    shares = [float(s.selected.float().mean()) for s in out.recursion.steps]
    assert shares == pytest.approx([0.75, 0.5, 0.25], abs=0.02)


# --- recursive KV sharing -------------------------------------------------------------------------
def test_shared_kv_later_steps_compute_and_cache_no_keys():
    model = build(recursion_kv="shared", init_std=0.3)
    rec = recursion_of(model)
    calls = []
    for block in rec.stack.blocks:
        block.attn.qkv.register_forward_hook(lambda m, args, out: calls.append(args[0].size(1)))
    idx = random_tokens(2, 30)
    out = model(idx)
    assert calls == [30] * model.config.stack_layers, "only the first step projects keys and values"
    state = model.new_state(2)
    assert all(kv is not None for kv in state.caches[1][0].blocks)
    assert all(kv is None for step in state.caches[1][1:] for kv in step.blocks)
    per_step = MoDTransformer(ModelConfig(**{**model.config.to_dict(), "recursion_kv": "recursion_wise"})).eval()
    per_step.load_state_dict(model.state_dict())
    assert not torch.allclose(per_step(idx).logits, out.logits, atol=1e-3)


def test_shared_kv_queries_attend_over_the_first_steps_keys():
    """A dense recursion of one shared block, written out: every later step's queries meet the
    first step's rotated keys and values, causally."""
    import torch.nn.functional as F

    from modlm.model.positions import apply_rope, rope_tables

    model = build(recursion_kv="shared", recursion_routing="dense", recursion_sharing="cycle", n_layers=3, init_std=0.3)
    cfg, block = model.config, recursion_of(model).stack.blocks[0]
    idx = random_tokens(2, 20)
    cos, sin = rope_tables(cfg, torch.arange(20).unsqueeze(0))
    heads = lambda t: t.view(2, 20, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # noqa: E731
    h = model.embed(idx)
    shared = None
    for _ in range(3):
        q, k, v = block.attn.qkv(block.attn_norm(h)).split(cfg.d_model, dim=-1)
        q, k, v = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin), heads(v)
        shared = (k, v) if shared is None else shared
        y = F.scaled_dot_product_attention(q, *shared, is_causal=True)
        a = block.attn.proj(y.transpose(1, 2).reshape(2, 20, -1))
        h = h + a + block.mlp(block.mlp_norm(h + a))
    torch.testing.assert_close(model(idx).logits, model.logits(h), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
def test_generation_reports_the_caches_against_a_plain_models(kv):
    from modlm.analysis.evaluate import generation_share, kv_caches

    model = build(recursion_kv=kv, init_std=0.3)
    cfg = model.config
    share = generation_share(model, random_tokens(2, 8), 12)
    caches = kv_caches(model.new_state(2))
    expected = 1.0 if kv == "recursion_wise" else (2 + cfg.stack_layers) / cfg.n_layers
    assert share["kv_cache_allocated_share"] == len(caches) / cfg.n_layers == expected
    # recursion-wise, later steps hold fewer tokens; shared, the first step (capacity 1) holds them all
    held = share["kv_cache_share"]
    assert 2 / cfg.n_layers < held < 1 if kv == "recursion_wise" else held == pytest.approx(expected)
    assert set(share) >= {"capacity_used.step_0", "capacity_used.step_2"}


# --- token choice ---------------------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_token_choice_gives_each_token_its_depth_up_front(routing):
    """Causal routing takes every token as deep as its router says; training fills each step's static slots
    with the tokens that ask for it, in temporal order, and a token past them exits there."""
    model = build(recursion_routing="token_choice", init_std=0.3, capacity_factor=0.6)
    cfg, rec = model.config, recursion_of(model)
    assert cfg.routed_steps == [] and cfg.routes_recursion and cfg.routes_tokens
    assert not list(rec.steps) and rec.depth_router.weight.shape == (3, 32)
    seen = []
    rec.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    idx = random_tokens(3, 32)
    out = model(idx, routing=routing)
    depth, probs = rec.depths(seen[0])
    assert len(depth.unique()) == 3, "the test needs every depth"
    taken = torch.ones_like(depth, dtype=torch.bool)
    for r, step in enumerate(out.recursion.steps):
        wants = (depth > r) & taken
        if routing == "causal":
            assert torch.equal(step.selected, wants)
        else:
            slots = cfg.token_choice_slots(32, r)
            assert torch.equal(step.selected, wants & (wants.cumsum(dim=1) <= slots))
        assert torch.equal(step.router_logits, probs.max(dim=-1).values)  # the weight of its updates
        taken = step.selected
    if routing == "causal":
        assert torch.equal(out.recursion.depth, depth)
    else:
        assert not torch.equal(out.recursion.depth, depth), "the test needs a step whose slots run out"


def test_token_choice_with_slots_for_every_token_trains_the_causal_computation():
    model = build(recursion_routing="token_choice", init_std=0.3, capacity_factor=3.0)  # slots: the whole sequence
    idx = random_tokens(3, 32)
    causal, trained = model(idx, routing="causal"), model(idx)
    assert torch.equal(causal.recursion.depth, trained.recursion.depth)
    # the same tokens; the padded batches differ in width, so rounding may differ
    torch.testing.assert_close(trained.logits, causal.logits, rtol=0, atol=1e-5 * float(causal.logits.abs().max()))


@torch.no_grad()
def test_token_choice_never_reads_a_later_token():
    model = build(recursion_routing="token_choice", init_std=0.3)
    idx = random_tokens(2, 32)
    changed = idx.clone()
    changed[:, 20:] = random_tokens(2, 12, seed=9)
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a.logits[:, :20], b.logits[:, :20], rtol=0, atol=1e-5 * float(a.logits.abs().max()))
    assert torch.equal(a.recursion.depth[:, :20], b.recursion.depth[:, :20])


def test_token_choice_router_learns_from_the_loss_and_the_balance():
    model = build(recursion_routing="token_choice").train()
    rec = recursion_of(model)
    idx = random_tokens(3, 33)
    model(idx[:, :-1], targets=idx[:, 1:]).loss.backward()  # through the weight of every update
    assert rec.depth_router.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out = model(idx[:, :-1])
    out.aux_loss.backward()
    assert rec.depth_router.weight.grad.abs().sum() > 0
    assert out.aux_loss == model.config.recursion_balance_weight * out.recursion.aux_losses["recursion_balance"]
    # the loss: 1 when the depths and the router's probabilities are uniform, N_r when all on one depth
    depth = torch.tensor([[1, 2, 3, 1, 2, 3]])
    uniform = torch.full((1, 6, 3), 1 / 3)
    assert rec.balance_loss(depth, uniform, None).item() == pytest.approx(1.0)
    one = torch.tensor([1.0, 0.0, 0.0]).expand(1, 6, 3)
    assert rec.balance_loss(torch.ones_like(depth), one, None).item() == pytest.approx(3.0)
    # padding counts for nothing
    valid = torch.tensor([[True] * 3 + [False] * 3])
    assert rec.balance_loss(torch.tensor([[1, 2, 3, 1, 1, 1]]), uniform, valid).item() == pytest.approx(1.0)
