"""Invariants of the MoD transformer: routing, causality, gradients, precision.

Every test uses a tiny model and a fixed seed; each asserts an exact property of the method,
and most of them catch one of the bugs found in public MoD code.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import modlm
from modlm import ModelConfig, MoDTransformer
from modlm.model.positions import Positions, apply_rope, rope_tables
from modlm.model.routing import RoutedBlock, topk_indices
from modlm.model.version import FORMAT, FormatError
from tests.helpers.models import V, random_tokens, tiny_config, tiny_model

T = 32


def block_input(block_seed=0, batch=3, length=T, d=32):
    g = torch.Generator().manual_seed(block_seed)
    return torch.randn(batch, length, d, generator=g)


def routed_block(**overrides) -> RoutedBlock:
    model = tiny_model(**overrides)
    return next(b for b in model.blocks if isinstance(b, RoutedBlock))


def full_rope(cfg, batch, length) -> Positions:
    return Positions.sequence(cfg, length)


# --- structure ------------------------------------------------------------------------------------
def test_route_every_picks_blocks():
    assert tiny_config(route_every=2, n_layers=6).routed_layers == [1, 3, 5]
    assert tiny_config(route_every=3, n_layers=6).routed_layers == [2, 5]
    assert tiny_config(route_every=1, n_layers=3).routed_layers == [0, 1, 2]
    dense = tiny_model(route_every=0)
    assert dense.config.routed_layers == []
    assert not any(isinstance(b, RoutedBlock) for b in dense.blocks)
    assert not any("router" in name or "predictor" in name for name, _ in dense.named_parameters())


def test_capacity_rounding():
    cfg = tiny_config()
    assert ModelConfig(capacity=0.125).topk_tokens(512) == 64
    assert tiny_config(capacity=0.29).topk_tokens(100) == 29  # floor(28.999999999999996) would give 28
    assert tiny_config(capacity=0.01).topk_tokens(10) == 1  # at least one token
    assert tiny_config(capacity=1.0).topk_tokens(7) == 7
    assert cfg.topk_tokens(33) == 8


def test_output_shapes_and_model_config():
    cfg = tiny_config()
    model = MoDTransformer(cfg)
    assert model.config is cfg
    out = model(random_tokens(3, T))
    assert out.logits.shape == (3, T, V)
    assert out.aux_loss.dim() == 0
    assert [r.layer for r in out.routing] == [1, 3]
    for r in out.routing:
        assert r.selected.shape == r.router_logits.shape == r.predictor_logits.shape == (3, T)
        assert r.selected.dtype == torch.bool
    assert tiny_model(causal_method="router")(random_tokens(3, T)).routing[0].predictor_logits is None


def test_tied_embeddings():
    model = tiny_model()
    assert model.lm_head.weight is model.embed.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


# --- the routed block -------------------------------------------------------------------------------
@pytest.mark.parametrize("router_weight", ["sigmoid", "raw"])
def test_full_capacity_equals_dense_scaled_by_router_weight(router_weight):
    block = routed_block(capacity=1.0, router_weight=router_weight)
    x = block_input()
    where = full_rope(block.cfg, 3, T)
    out, info = block(x, where, "topk")
    assert info.selected.all()
    r = x @ block.router.weight.squeeze(0)
    w = torch.sigmoid(r) if router_weight == "sigmoid" else r
    expected = x + w.unsqueeze(-1) * block.block(x, where, residual=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_topk_selects_k_per_row_in_temporal_order_and_leaves_others_unchanged():
    block = routed_block()
    x = block_input(batch=4)
    where = full_rope(block.cfg, 4, T)
    out, info = block(x, where, "topk")
    k = block.cfg.topk_tokens(T)
    assert (info.selected.sum(dim=1) == k).all()
    idx = topk_indices(info.router_logits, k)
    assert (idx[:, 1:] > idx[:, :-1]).all(), "gathered tokens must stay in temporal order"
    assert torch.equal(out[~info.selected], x[~info.selected]), "skipped tokens must be bit-for-bit unchanged"
    assert not torch.equal(out[info.selected], x[info.selected])
    # every row picks its own top-k: the lowest picked score beats the highest skipped one
    r = info.router_logits
    lowest_picked = r.masked_fill(~info.selected, float("inf")).min(dim=1).values
    highest_skipped = r.masked_fill(info.selected, float("-inf")).max(dim=1).values
    assert (lowest_picked > highest_skipped).all()


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_attention_and_mlp_run_on_gathered_tokens_only(routing):
    block = routed_block(capacity=0.5)
    x = block_input(batch=2)
    where = full_rope(block.cfg, 2, T)
    seen = {}
    block.block.attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("attn", args[0].shape))
    block.block.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("mlp", args[0].shape))
    _, info = block(x, where, routing)
    n = int(info.selected.sum(dim=1).max())
    assert 0 < n < T
    assert seen["attn"] == seen["mlp"] == (2, n, 32)


def reference_masked_block(block: RoutedBlock, x, selected):
    """Full-length reference: every token computed, keys restricted to selected tokens, original
    positions for RoPE. Slow but obviously right; the routed block must agree on picked tokens."""
    cfg, inner = block.cfg, block.block
    B, L, _ = x.shape
    cos, sin = rope_tables(cfg, torch.arange(L).unsqueeze(0))
    h = inner.attn_norm(x)
    q, k, v = inner.attn.qkv(h).view(B, L, 3, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    keys = selected[:, None, None, :] | torch.eye(L, dtype=torch.bool)  # diagonal keeps skipped rows finite
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal & keys)
    a = inner.attn.proj(y.transpose(1, 2).reshape(B, L, -1))
    delta = a + inner.mlp(inner.mlp_norm(x + a))
    w = block.router.weight_of(x @ block.router.weight.squeeze(0))
    return torch.where(selected.unsqueeze(-1), x + w.unsqueeze(-1) * delta, x)


@pytest.mark.parametrize("routing", ["topk", "causal"])
@pytest.mark.parametrize("causal_method", ["router", "predictor"])
def test_gathered_block_equals_masked_full_length_reference(routing, causal_method):
    block = routed_block(capacity=0.5 if routing == "causal" else 0.25, causal_method=causal_method)
    x = block_input(batch=3)
    where = full_rope(block.cfg, 3, T)
    out, info = block(x, where, routing)
    counts = info.selected.sum(dim=1)
    assert (counts > 0).all() and (counts < T).all()
    expected = reference_masked_block(block, x, info.selected)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize("router_weight", ["sigmoid", "raw"])
def test_router_gets_gradient_from_the_language_model_loss(router_weight):
    model = tiny_model(router_weight=router_weight).train()
    idx = random_tokens(3, T)
    out = model(idx[:, :-1], targets=idx[:, 1:])
    out.loss.backward()  # LM loss alone: the router weight on the residual path is the only route
    for block in model.blocks:
        if isinstance(block, RoutedBlock):
            assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0


def test_predictor_loss_does_not_reach_the_trunk():
    model = tiny_model(causal_method="predictor").train()
    out = model(random_tokens(3, T))
    out.aux_loss.backward()
    for name, p in model.named_parameters():
        if ".predictor." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), f"predictor loss leaked into {name}"


def test_router_bce_trains_the_router():
    model = tiny_model(causal_method="router").train()
    model(random_tokens(3, T)).aux_loss.backward()
    routers = [b.router.weight.grad for b in model.blocks if isinstance(b, RoutedBlock)]
    assert all(g is not None and g.abs().sum() > 0 for g in routers)


def test_aux_loss_targets_are_each_rows_own_topk():
    for method in ("router", "predictor"):
        model = tiny_model(causal_method=method, route_every=1)
        idx = random_tokens(4, T)
        out = model(idx)
        k = model.config.topk_tokens(T)
        terms = []
        for info in out.routing:
            assert (info.topk.sum(dim=1) == k).all(), "every row must get k positive targets"
            for b in range(4):  # each row's targets are the top-k of that row's own router logits
                expected = torch.zeros(T, dtype=torch.bool)
                expected[info.router_logits[b].topk(k).indices] = True
                assert torch.equal(info.topk[b], expected)
            logits = info.predictor_logits if method == "predictor" else info.router_logits
            terms.append(F.binary_cross_entropy_with_logits(logits, info.topk.float()))
        weight = model.config.predictor_aux_weight if method == "predictor" else model.config.router_aux_weight
        torch.testing.assert_close(out.aux_loss, weight * torch.stack(terms).mean())


# --- causality ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal_method", ["router", "predictor"])
def test_causal_routing_is_causal(causal_method):
    model = tiny_model(causal_method=causal_method, capacity=0.5)
    idx = random_tokens(2, T)
    base = model(idx, routing="causal")
    picked = torch.stack([r.selected for r in base.routing])
    assert picked.any() and not picked.all(), "the test needs a mix of processed and skipped tokens"
    for t in (0, 7, 20, T - 2):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(T - t - 1)) % V
        out = model(changed, routing="causal")
        torch.testing.assert_close(out.logits[:, : t + 1], base.logits[:, : t + 1], rtol=0, atol=1e-5)


def test_topk_routing_is_not_causal():
    """Documents why causal routing exists: under top-k, later tokens change earlier outputs."""
    model = tiny_model(capacity=0.25)
    idx = random_tokens(2, T)
    base = model(idx, routing="topk").logits
    changed = idx.clone()
    changed[:, T // 2 :] = (changed[:, T // 2 :] + 5) % V
    out = model(changed, routing="topk").logits
    assert not torch.allclose(out[:, : T // 2], base[:, : T // 2], atol=1e-4)


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_rows_are_independent(routing):
    model = tiny_model(capacity=0.5)
    idx = random_tokens(4, T)
    together = model(idx, routing=routing)
    for b in range(4):
        alone = model(idx[b : b + 1], routing=routing)
        torch.testing.assert_close(alone.logits[0], together.logits[b], rtol=1e-5, atol=1e-5)
        for a, t in zip(alone.routing, together.routing):
            assert torch.equal(a.selected[0], t.selected[b])


def test_causal_rows_may_select_nothing():
    """With the plain decision (logit > 0) a row whose logits are all negative processes nothing."""
    block = routed_block(causal_method="router", capacity=0.5, causal_decision="plain")
    x = block_input(batch=2)
    with torch.no_grad():
        block.router.weight.copy_(torch.ones_like(block.router.weight))
    x[0] = -x[0].abs()  # row 0: every router logit negative, nothing processed
    x[1] = x[1].abs()  # row 1: everything processed
    where = full_rope(block.cfg, 2, T)
    out, info = block(x, where, "causal")
    assert info.selected.sum(dim=1).tolist() == [0, T]
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out, reference_masked_block(block, x, info.selected), rtol=1e-5, atol=1e-5)


def test_dense_model_ignores_routing_mode():
    model = tiny_model(route_every=0)
    idx = random_tokens(3, T)
    topk, causal = model(idx, routing="topk"), model(idx, routing="causal")
    assert torch.equal(topk.logits, causal.logits)
    assert topk.routing == [] and topk.aux_loss.item() == 0.0


def test_random_routing_control_picks_at_random():
    """``random_routing``: top-k training picks k tokens per row at random, not by router score;
    the picks follow the torch seed (the same seed repeats them, another changes them), and causal
    routing keeps each token with probability ``capacity``. The router still weighs the update."""
    model = tiny_model(random_routing=True, capacity=0.25)
    idx = random_tokens(4, T)
    k = model.config.topk_tokens(T)
    runs = {}
    for name, seed in (("a", 1), ("again", 1), ("other", 2)):
        torch.manual_seed(seed)
        runs[name] = model(idx), model(idx, routing="causal")
    (a, a_causal), (again, again_causal), (other, other_causal) = runs["a"], runs["again"], runs["other"]
    assert torch.equal(a.logits, again.logits) and torch.equal(a_causal.logits, again_causal.logits)
    for info, same, new, causal in zip(a.routing, again.routing, other.routing, a_causal.routing):
        assert (info.selected.sum(dim=1) == k).all()
        by_score = torch.zeros_like(info.selected).scatter_(1, topk_indices(info.router_logits, k), True)
        assert all(not torch.equal(info.selected[b], by_score[b]) for b in range(4)), "picked by router score"
        assert torch.equal(info.selected, same.selected), "the same seed must repeat the picks"
        assert not torch.equal(info.selected, new.selected), "another seed must change them"
        assert torch.equal(info.topk, info.selected)
        # causal: a coin per token (128 of them: the share is 0.25 +- 0.04)
        assert abs(causal.selected.float().mean().item() - 0.25) < 0.15
        assert not torch.equal(causal.selected, causal.router_logits > 0)
    assert not all(torch.equal(x.selected, y.selected) for x, y in zip(a_causal.routing, other_causal.routing))
    assert a.aux_loss.item() == 0.0


def test_a_one_token_sequence():
    """T=1: top-k processes its one token (k is at least 1) and computes what full capacity does;
    causal routing gives the first position of a longer causal pass."""
    model = tiny_model(capacity=0.25)
    full = tiny_model(capacity=1.0)
    idx = random_tokens(3, T)
    one = model(idx[:, :1], targets=idx[:, 1:2])
    assert all(info.selected.shape == (3, 1) and info.selected.all() for info in one.routing)
    torch.testing.assert_close(one.logits, full(idx[:, :1]).logits, rtol=0, atol=0)
    assert torch.isfinite(one.loss) and torch.isfinite(one.aux_loss)
    causal = model(idx[:, :1], routing="causal")
    torch.testing.assert_close(causal.logits, model(idx, routing="causal").logits[:, :1], rtol=0, atol=1e-5)


def test_full_capacity_causal_routing_processes_every_token():
    """At ``capacity=1.0`` the predictor starts at the base rate of 1 (less 1e-3), so causal routing
    processes every token and equals top-k routing, which at full capacity processes them all."""
    model = tiny_model(capacity=1.0, causal_method="predictor")
    idx = random_tokens(3, T)
    causal, topk = model(idx, routing="causal"), model(idx, routing="topk")
    assert all(info.selected.all() for info in causal.routing + topk.routing)
    torch.testing.assert_close(causal.logits, topk.logits, rtol=0, atol=1e-5)
    state = model.new_state(3)
    steps = [model.prefill(idx[:, :4], state)] + [model.decode_step(idx[:, t], state).unsqueeze(1) for t in range(4, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), causal.logits, rtol=0, atol=1e-5)
    assert all(int(kv.length.min()) == T for kv in state.caches)


# --- precision --------------------------------------------------------------------------------------
BF16_SEEDS = {"topk": 0, "causal": 35}
"""Models whose routing decisions lie away from their thresholds on ``bf16_batch()``: a score that
bf16 rounding moves across the k-th largest (top-k) or across 0 (causal) would flip a decision and
change the logits by far more than rounding. At these seeds the smallest fp32 margin is about 5
(causal) and 15 (top-k) times the largest change bf16 (autocast or bf16 weights) makes to a score."""


def bf16_model(routing: str) -> MoDTransformer:
    return tiny_model(
        seed=BF16_SEEDS[routing], capacity=0.25 if routing == "topk" else 0.5, init_std=0.1, causal_method="predictor"
    )


def bf16_batch() -> torch.Tensor:
    return random_tokens(2, 17)


def bf16_tolerance(reference: torch.Tensor) -> float:
    """bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); through 4 blocks the
    logits of these models move by at most 0.6% of their largest value. 2% is three times that, and
    a block update lost (every routed block skipped) moves them by 30%."""
    return 0.02 * float(reference.abs().max())


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_bf16_autocast_matches_fp32(routing):
    """Under bf16 autocast the logits are the fp32 logits up to bf16 rounding, the routing decisions
    are the same, and training's backward stays finite."""
    model = bf16_model(routing).train()
    idx = bf16_batch()
    ref = model(idx[:, :-1], routing=routing, targets=idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx[:, :-1], routing=routing, targets=idx[:, 1:])
        (out.loss + out.aux_loss).backward()
    assert out.logits.dtype == torch.bfloat16
    picked = torch.stack([info.selected for info in ref.routing])
    assert picked.any() and not picked.all()
    for got, want in zip(out.routing, ref.routing):
        assert torch.equal(got.selected, want.selected), f"block {want.layer} routed differently under bf16"
        assert got.router_logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), ref.logits, rtol=0, atol=bf16_tolerance(ref.logits))
    assert abs(out.loss.item() - ref.loss.item()) < 0.01 * ref.loss.item()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["autocast", "weights"])
def test_bf16_decoding_agrees_with_its_own_causal_forward(precision):
    """Decoding in bf16 (under autocast, or a model cast to bf16) caches bf16 keys and gives the
    logits of the same model's causal forward in the same precision, up to bf16 rounding."""
    model = bf16_model("causal")
    if precision == "weights":
        model = model.to(torch.bfloat16)
    idx = bf16_batch()[:, :-1]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    with context, torch.no_grad():
        full = model(idx, routing="causal").logits.float()
        for prefill in (1, 6):
            state = model.new_state(2)
            steps = [model.prefill(idx[:, :prefill], state)]
            steps += [model.decode_step(idx[:, t], state).unsqueeze(1) for t in range(prefill, idx.size(1))]
            logits = torch.cat(steps, dim=1)
            assert logits.dtype == torch.bfloat16 and state.caches[0].k.dtype == torch.bfloat16
            torch.testing.assert_close(logits.float(), full, rtol=0, atol=bf16_tolerance(full))


def test_compile_traces_the_training_forward_without_graph_breaks():
    """``compile: true`` must trace a training forward as one graph: any host sync in top-k routing
    (``.item()``, ``.tolist()``, a Python branch on a tensor) would split every routed block. One such
    break (torch 2.11 could not trace ``torch.amp.is_autocast_available`` in the router's fp32
    region) split every routed block and hit dynamo's recompile limit on an H200. ``explain`` traces
    without compiling, so this is fast. Causal routing picks a data-dependent number of tokens, so
    it breaks the graph by design."""
    torch._dynamo.reset()
    model = tiny_model().train()
    idx = random_tokens(3, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = torch._dynamo.explain(model)(idx[:, :-1], routing="topk", targets=idx[:, 1:])
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


# one in the default run; the others (seconds of compiling each) with the slow tests
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(causal_method="predictor"), marks=pytest.mark.slow),
        dict(causal_method="router", router_weight="raw"),
        pytest.param(dict(n_experts=2, noop_experts=1, capacity_factor=0.75), marks=pytest.mark.slow),
    ],
    ids=["predictor", "router-raw", "staged-mode"],
)
def test_compiled_training_step_equals_eager(overrides):
    """The compiled training forward run, not only traced: the whole model under ``torch.compile``
    (one graph, through AOTAutograd with the ``aot_eager`` backend: captured, functionalised and
    run with its compiled backward, without inductor's C++ compilation) gives the eager losses,
    routing decisions and gradients. Inductor itself runs in ``test_module.py``'s compile test."""
    torch._dynamo.reset()
    eager, compiled = tiny_model(**overrides).train(), tiny_model(**overrides).train()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    idx = random_tokens(3, T)
    outs = []
    for run in (step, eager):
        out = run(idx[:, :-1], routing="topk", targets=idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        outs.append(out)
    got, want = outs
    assert got.aux_loss.item() > 0
    torch.testing.assert_close((got.loss, got.aux_loss), (want.loss, want.aux_loss))
    torch.testing.assert_close(got.logits, want.logits)
    assert all(torch.equal(a.selected, b.selected) for a, b in zip(got.routing, want.routing))
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


# --- saving -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_save_and_load_pretrained_round_trip(tmp_path, capsys, tie_embeddings):
    """The model's layer of saving: ``save_pretrained``/``from_pretrained``/``push_to_hub`` are
    huggingface_hub's mixin. A folder holds the weights (safetensors), a ``config.json`` of the
    config's fields and nothing else, and a model card; loading rebuilds the same model (tied or
    not, in eval mode) quietly, ignores other tools' keys in ``config.json``, and is strict (a
    missing weight is an error). What an export folder adds is ``test_export.py``'s layer."""
    import json

    import safetensors.torch
    from huggingface_hub import PyTorchModelHubMixin

    model = tiny_model(tie_embeddings=tie_embeddings, causal_method="predictor", init_std=0.3)
    assert isinstance(model, PyTorchModelHubMixin) and callable(model.push_to_hub)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config == {**model.config.to_dict(), "modlm_version": modlm.__version__, "modlm_format": FORMAT}
    assert "modlm" in (folder / "README.md").read_text()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "modlm", "dtype": "float32"}))
    capsys.readouterr()
    loaded = MoDTransformer.from_pretrained(folder)
    assert capsys.readouterr().out == ""
    assert loaded.config == model.config and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie_embeddings
    idx = random_tokens(2, 20)
    for routing in ("topk", "causal"):
        assert torch.equal(loaded(idx, routing=routing).logits, model(idx, routing=routing).logits)
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    del weights["norm.weight"]
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(RuntimeError, match="norm.weight"):
        MoDTransformer.from_pretrained(folder)


def test_a_folder_of_another_format_is_refused_in_one_line(tmp_path):
    """A folder records the modlm that wrote it; one of another format (or of modlm before 0.2.0, which
    recorded nothing) is refused, naming that version, before any weight is read into a model it may not
    fit."""
    import json

    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert MoDTransformer.from_pretrained(tmp_path).config == model.config
    for record, version in (({"modlm_version": "9.0.0", "modlm_format": FORMAT + 1}, "9.0.0"), ({}, "before 0.2.0")):
        fields = {k: v for k, v in config.items() if not k.startswith("modlm_")}
        (tmp_path / "config.json").write_text(json.dumps({**fields, **record}))
        with pytest.raises(FormatError, match=f"written by modlm {version} .*read it with the modlm that wrote it"):
            MoDTransformer.from_pretrained(tmp_path)


# --- errors -----------------------------------------------------------------------------------------
def test_forward_rejects_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="routing"):
        model(random_tokens(3, T), routing="sometimes")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(3, 65))
