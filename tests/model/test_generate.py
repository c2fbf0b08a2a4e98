"""KV-cached decoding with causal routing equals one causal forward pass.

Decoding steps run two ways: on the CPU a routed block reads its per-row decisions on the host and
skips the rows that say no; under ``torch.compile`` (and on accelerators) every row runs the block
and skipping rows are masked. Both must give the same logits and the same caches.
"""
import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.evaluate import decode_throughput
from modlm.model.config import STATIC, DecodePolicy
from modlm.model.generate import generate
from modlm.model.routing import RoutedBlock

V = 97


def build(seed=0, **overrides) -> MoDTransformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, capacity=0.5, route_every=2)
    return MoDTransformer(ModelConfig(**{**base, **overrides})).eval()


def tokens(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


METHODS = ["router", "predictor"]


@pytest.fixture(params=["host_decides", "masked", "static"])
def policy(request) -> DecodePolicy:
    """Run the test with routed blocks skipping rows on the host, then with masked steps (as on an
    accelerator), then with masked steps that read every cache slot (as compiled)."""
    return {"host_decides": DecodePolicy(host_decides=True, bounded_reads=True),
            "masked": DecodePolicy(host_decides=False, bounded_reads=True), "static": STATIC}[request.param]


def decode(model, idx, prefill, policy=None):
    """Logits (B, T, V) of ``idx`` fed as a prompt of ``prefill`` tokens, then one token per step,
    and the decoding state after it."""
    state = model.new_state(idx.size(0))
    steps = [model.prefill(idx[:, :prefill], state)]
    steps += [model.decode_step(idx[:, t], state, policy).unsqueeze(1) for t in range(prefill, idx.size(1))]
    return torch.cat(steps, dim=1), state


@pytest.mark.parametrize("causal_method", METHODS)
@pytest.mark.parametrize("prefill", [1, 9])
def test_cached_decoding_equals_causal_forward(causal_method, prefill, policy):
    model = build(causal_method=causal_method)
    idx = tokens(3, 40)
    full = model(idx, routing="causal")
    picked = torch.stack([r.selected for r in full.routing])
    assert picked.any() and not picked.all(), "the test needs routed blocks that skip some tokens"
    logits, _ = decode(model, idx, prefill, policy)
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal_method", METHODS)
def test_routed_block_cache_holds_exactly_the_processed_tokens(causal_method, policy):
    model = build(causal_method=causal_method)
    idx = tokens(2, 30)
    full = model(idx, routing="causal")
    _, cache = decode(model, idx, 5, policy)
    routed = {info.layer: info.selected for info in full.routing}
    for layer, (block, kv) in enumerate(zip(model.blocks, cache.caches)):
        for row in range(2):
            n = int(kv.length[row])
            if isinstance(block, RoutedBlock):
                expected = routed[layer][row].nonzero().flatten()  # processed tokens, original positions
            else:
                expected = torch.arange(30)
            assert torch.equal(kv.positions[row, :n], expected), f"block {layer} row {row}"
            assert (kv.positions[row, n:kv.max_len] == -1).all()
    assert any(int(kv.length.min()) < 30 for kv in cache.caches), "routed blocks must store fewer tokens"


def test_skipping_rows_do_no_block_work():
    """A decoding step runs a routed block's attention and MLP on exactly the rows that chose it:
    none at all when every row skips, and a routed block's decision needs no sorting of tokens."""
    model = build(causal_method="router")
    idx = tokens(4, 24)
    full = model(idx, routing="causal")
    routed = [b for b in model.blocks if isinstance(b, RoutedBlock)]
    rows_seen = {b.layer: [] for b in routed}
    for b in routed:
        b.block.register_forward_pre_hook(lambda m, args, layer=b.layer: rows_seen[layer].append(args[0].size(0)))
    cache = model.new_state(4)
    model.prefill(idx[:, :8], cache)
    for b in routed:
        rows_seen[b.layer].clear()
    with torch.autograd.profiler.profile() as prof:
        for t in range(8, 24):
            model.decode_step(idx[:, t], cache)
    assert not any("sort" in e.name for e in prof.function_events), "a one-token step must not sort"
    for info in full.routing:
        per_step = info.selected[:, 8:].sum(dim=0).tolist()  # rows that chose the block, per step
        assert 0 in per_step and any(0 < n < 4 for n in per_step), "the test needs steps with no and some rows"
        assert rows_seen[info.layer] == [n for n in per_step if n > 0]


def test_decode_state_is_preallocated():
    """Decoding writes into buffers allocated once: no step reallocates or grows a cache."""
    model = build()
    idx = tokens(2, 20)
    cache = model.new_state(2)
    buffers = [(kv.k.data_ptr(), kv.v.data_ptr(), kv.positions.data_ptr(), kv.k.shape) for kv in cache.caches]
    model.prefill(idx[:, :5], cache)
    for t in range(5, 20):
        model.decode_step(idx[:, t], cache)
    assert [(kv.k.data_ptr(), kv.v.data_ptr(), kv.positions.data_ptr(), kv.k.shape) for kv in cache.caches] == buffers
    assert cache.caches[0].k.shape == (2, 4, 64 + 1, 8)  # max_seq_len slots and the spare one


@pytest.mark.parametrize("causal_method", METHODS)
def test_decode_step_traces_whole_and_matches_eager(causal_method):
    """The decode step is one graph for ``torch.compile`` (fullgraph would raise on any break, such
    as a host read of a routing decision); traced with the eager backend, so this stays fast."""
    torch._dynamo.reset()
    model = build(causal_method=causal_method)
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 9, 6)]
    traced = torch.compile(model.decode_compute, backend="eager", fullgraph=True, dynamic=False)
    compiled = generate(model, prompts, 12, temperature=0,
                        decode_step=lambda t, s: model.decode_step(t, s, STATIC, compute=traced))
    eager = generate(model, prompts, 12, temperature=0)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_prompts_of_different_lengths_batch_like_single_prompts():
    model = build()
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 11, 7)]
    together = model.generate(prompts, max_new_tokens=6, temperature=0)
    for prompt, out in zip(prompts, together):
        alone = model.generate(prompt.unsqueeze(0), max_new_tokens=6, temperature=0)[0]
        assert torch.equal(out, alone)
        assert torch.equal(out[: len(prompt)], prompt) and len(out) == len(prompt) + 6


def test_greedy_generation_matches_argmax_of_full_causal_forward():
    model = build(causal_method="router")
    seq = tokens(1, 6)
    out = model.generate(seq, max_new_tokens=8, temperature=0)
    for _ in range(8):  # the slow way: one full causal pass per new token
        nxt = model(seq, routing="causal").logits[:, -1].argmax(dim=-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_sampling_filters():
    model = build()
    prompt = tokens(2, 4)
    greedy = model.generate(prompt, 5, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 5, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 5, temperature=0.7, top_p=1e-6, generator=g), greedy)
    a = model.generate(prompt, 5, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 5, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_stops_at_end_of_text():
    model = build()
    prompt = tokens(1, 4)
    first = int(model.generate(prompt, 1, temperature=0)[0, -1])
    out = model.generate(prompt, 10, temperature=0, eot_id=first)
    assert out.shape == (1, 14) and (out[0, 4:] == first).all()  # stopped, padded with eot
    assert len(model.generate([prompt[0].tolist()], 10, temperature=0, eot_id=first)[0]) == 5


def test_length_and_mode_errors():
    model = build()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(tokens(1, 60), max_new_tokens=5)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="routing='sideways' is invalid"):
        model(tokens(1, 4), routing="sideways")


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_save_and_load_pretrained_round_trip(tmp_path, tie_embeddings):
    model = build(tie_embeddings=tie_embeddings, causal_method="predictor")
    model.save_pretrained(tmp_path / "export")
    # weights, the config's fields, and huggingface_hub's model card
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = MoDTransformer.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie_embeddings
    idx = tokens(2, 20)
    assert torch.equal(loaded(idx, routing="causal").logits, model(idx, routing="causal").logits)


def test_decode_throughput_counts_every_generated_token():
    model = build()
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 11, 7, 5)]
    figures = decode_throughput(model, prompts, new_tokens=6, reps=1)
    assert figures["batch"] == 4 and figures["new_tokens"] == 6
    assert figures["tokens_per_s"] == pytest.approx(4 * 6 / figures["seconds"])
