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
from modlm.model.generate import compile_decode_step, generate
from modlm.model.routing import RoutedBlock

V = 97


def build(seed=0, **overrides) -> MoDTransformer:
    """A tiny random model. ``init_std=0.3``: at the default 0.02 the tied embedding makes an
    untrained model's argmax its last input token, so every greedy continuation repeats one token
    whatever attention and routing compute; at 0.3 continuations vary and depend on the context."""
    torch.manual_seed(seed)
    base = dict(
        vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, capacity=0.5, route_every=2, init_std=0.3
    )
    return MoDTransformer(ModelConfig(**{**base, **overrides})).eval()


def varied(continuation: torch.Tensor) -> bool:
    """Whether a greedy continuation is more than one token repeated (so it tests decoding)."""
    return len(set(continuation.tolist())) > 2


def ragged_prompts() -> list[torch.Tensor]:
    """Three prompts of 3, 11 and 7 tokens whose greedy continuations vary under both methods."""
    return [tokens(1, n, seed=n + 2)[0] for n in (3, 11, 7)]


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to fp32 rounding: a cached step multiplies matrices of other shapes than a whole
    pass, which reorders sums; that costs a few tens of ulps of the largest logit (about 2e-6 of
    it here), and any real decoding error (a key too many or too few) costs orders more."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.detach().abs().max()))


def tokens(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


METHODS = ["router", "predictor"]


@pytest.fixture(params=["host_decides", "masked", "static"])
def policy(request) -> DecodePolicy:
    """Run the test with routed blocks skipping rows on the host, then with masked steps (as on an
    accelerator), then with masked steps that read every cache slot (as compiled)."""
    return {
        "host_decides": DecodePolicy(host_decides=True, bounded_reads=True),
        "masked": DecodePolicy(host_decides=False, bounded_reads=True),
        "static": STATIC,
    }[request.param]


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
    assert_same_logits(logits, full.logits)


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
            assert (kv.positions[row, n : kv.max_len] == -1).all()
    assert any(int(kv.length.min()) < 30 for kv in cache.caches), "routed blocks must store fewer tokens"


def test_skipping_rows_do_no_block_work():
    """A decoding step runs a routed block's attention and MLP on exactly the rows that chose it:
    none at all when every row skips, and a routed block's decision needs no sorting of tokens."""
    model = build(causal_method="router", init_std=0.02)  # a mix of steps where no, some and all rows route
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


def test_prefill_of_right_padded_prompts_caches_only_their_real_tokens():
    """``prefill(batch, state, n_real=...)``: each row's real tokens get the logits, cache entries
    and token count of that prompt alone; the padding (here a real token id) is neither cached nor
    counted, ``last_only`` gives each row's last real token, and decoding goes on at each row's
    own position."""
    model = build()
    prompts = ragged_prompts()
    lengths = torch.tensor([len(p) for p in prompts])
    batch = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=5)
    state, last_state = model.new_state(3), model.new_state(3)
    logits = model.prefill(batch, state, n_real=lengths)
    last = model.prefill(batch, last_state, n_real=lengths, last_only=True)
    assert state.seen.tolist() == lengths.tolist() and state.filled == int(lengths.max())
    alone = []
    for b, prompt in enumerate(prompts):
        mine = model.new_state(1)
        want = model.prefill(prompt.unsqueeze(0), mine)
        assert_same_logits(logits[b, : len(prompt)], want[0])
        assert_same_logits(last[b], want[0, -1])
        for layer, (kv, own) in enumerate(zip(state.caches, mine.caches)):
            n = int(own.length[0])
            assert int(kv.length[b]) == n, f"block {layer} row {b}: padding cached"
            assert torch.equal(kv.positions[b, :n], own.positions[0, :n]) and (kv.positions[b, n:] == -1).all()
            torch.testing.assert_close(kv.k[b, :, :n], own.k[0, :, :n], rtol=0, atol=1e-5)
        alone.append(mine)
    following = tokens(3, 1, seed=9)[:, 0]
    step = model.decode_step(following, state)
    for b, mine in enumerate(alone):
        assert_same_logits(step[b], model.decode_step(following[b : b + 1], mine)[0])
    assert state.seen.tolist() == (lengths + 1).tolist()


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
    prompts = ragged_prompts()
    traced = torch.compile(model.decode_compute, backend="eager", fullgraph=True, dynamic=False)
    compiled = generate(
        model, prompts, 12, temperature=0, decode_step=lambda t, s: model.decode_step(t, s, STATIC, compute=traced)
    )
    eager = generate(model, prompts, 12, temperature=0)
    assert all(varied(out[len(p) :]) for out, p in zip(eager, prompts))
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_compile_decode_step_generates_what_eager_decoding_does(monkeypatch):
    """``compile_decode_step`` as ``generate`` uses it: the compiled step (static policy, every
    slot read) gives eager greedy decoding's tokens. Compiled through AOTAutograd with the
    ``aot_eager`` backend: the graph is captured, functionalised and run, without inductor's
    minute of C++ compilation on a CPU."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    model = build(causal_method="predictor")
    prompts = ragged_prompts()
    step = compile_decode_step(model)
    calls = []
    counted = lambda token, state: calls.append(state.filled) or step(token, state)  # noqa: E731
    compiled = generate(model, prompts, 10, temperature=0, decode_step=counted)
    eager = generate(model, prompts, 10, temperature=0)
    longest = max(len(p) for p in prompts)
    assert calls == list(range(longest, longest + 9)), "generate must drive every step through the compiled one"
    assert all(varied(out[len(p) :]) for out, p in zip(eager, prompts))
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", [dict(causal_method="predictor"), dict(decision_logit="standardized_router")])
def test_compiled_decoding_writes_only_static_tensors_and_compiles_once(monkeypatch, variant):
    """CUDA graphs record a step once and replay it only if every tensor it reads or writes stays where it
    was: torch runs a step that mutates a tensor it does not know as static without graphs, and a new state
    per ``generate`` call would record again. Here the graph the step compiles to is captured (a backend
    that runs it as traced): every tensor input but the new tokens is a parameter, a buffer or a state
    tensor marked static; two ``generate`` calls of one batch size compile once and decode into one state,
    emptied in place, and give eager decoding's tokens both times (a state not emptied would show the
    first call's keys to the second)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": capture, "mode": None}))
    torch._dynamo.reset()
    model = build(**variant)
    prompts = ragged_prompts()
    step = compile_decode_step(model)
    first = generate(model, prompts, 10, temperature=0, decode_step=step)
    state = step.new_state(len(prompts))
    second = generate(model, prompts, 10, temperature=0, decode_step=step)
    eager = generate(model, prompts, 10, temperature=0)
    assert all(varied(out[len(p) :]) for out, p in zip(eager, prompts))
    assert all(torch.equal(a, c) and torch.equal(b, c) for a, b, c in zip(first, second, eager))
    assert len(graphs) == 1, "one batch size, one compilation"
    assert step.new_state(len(prompts)) is state and state.filled == 0
    moving = [tuple(t.shape) for t in graphs[0] if getattr(t, "_dynamo_static_input_type", None) is None]
    assert moving == [(len(prompts),)], f"only the new tokens may change address between steps: {moving}"


def test_bounded_decoding_reads_exactly_the_filled_slots(monkeypatch):
    """A decoding step under a bounded policy attends over ``filled + 1`` cache slots, the slots
    any row may hold after the step (its own new key included); the static policy reads every
    slot and the spare one. One slot too few would hide the new key from its own query, one too
    many would read a slot nobody wrote."""
    import modlm.model.layers as layers

    model = build()
    idx = tokens(2, 12)
    state = model.new_state(2)
    model.prefill(idx[:, :4], state)
    seen = []
    real_sdpa = layers.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(k.size(-2))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    for policy in (
        DecodePolicy(host_decides=True, bounded_reads=True),
        DecodePolicy(host_decides=False, bounded_reads=True),
    ):
        for t in range(4, 8) if policy.host_decides else range(8, 12):
            seen.clear()
            filled = state.filled
            model.decode_step(idx[:, t], state, policy)
            assert seen and set(seen) == {filled + 1}, (policy, t, seen)
    seen.clear()
    model.decode_step(idx[:, 0], state, STATIC)
    assert set(seen) == {model.config.max_seq_len + 1}


@pytest.mark.parametrize("causal_method", METHODS)
def test_prompts_of_different_lengths_batch_like_single_prompts(causal_method):
    """Right-padded prompts of different lengths generate, together, what each generates alone:
    no row attends to another's padding and every row continues at its own position."""
    model = build(causal_method=causal_method)
    prompts = ragged_prompts()
    together = model.generate(prompts, max_new_tokens=8, temperature=0)
    for prompt, out in zip(prompts, together):
        alone = model.generate(prompt.unsqueeze(0), max_new_tokens=8, temperature=0)[0]
        assert torch.equal(out, alone)
        assert torch.equal(out[: len(prompt)], prompt) and len(out) == len(prompt) + 8
        assert varied(out[len(prompt) :])


@pytest.mark.parametrize("causal_method", METHODS)
def test_greedy_generation_matches_argmax_of_full_causal_forward(causal_method):
    model = build(causal_method=causal_method)
    seq = tokens(3, 6)
    out = model.generate(seq, max_new_tokens=10, temperature=0)
    for _ in range(10):  # the slow way: one full causal pass per new token
        nxt = model(seq, routing="causal").logits[:, -1].argmax(dim=-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    assert all(varied(row[6:]) for row in out)


def test_sampling_filters():
    """Settings that reduce to greedy decode greedily, and a seeded generator repeats itself (the
    distributions themselves are ``test_sampling.py``'s)."""
    model = build()
    prompt = tokens(2, 4)
    greedy = model.generate(prompt, 5, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 5, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 5, temperature=0.7, top_p=1e-6, generator=g), greedy)
    a = model.generate(prompt, 5, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 5, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def first_at(row: torch.Tensor, token: int):
    """Index of the first ``token`` in ``row``, or None."""
    hits = (row == token).nonzero()
    return int(hits[0]) if len(hits) else None


def test_rows_stop_at_their_own_end_of_text():
    """With ``eot_id`` each row stops after its own first end-of-text and is padded with it, while
    the other rows go on generating exactly what they would have without it."""
    model = build()
    prompts = tokens(4, 5)
    free = model.generate(prompts, 12, temperature=0)[:, 5:]
    # an end-of-text token that rows emit at different steps, and that some row never emits
    candidates = []
    for eot in free.unique().tolist():
        stops = [first_at(row, eot) for row in free]
        hit = [s for s in stops if s is not None]
        if None in stops and len(set(hit)) >= 2 and min(hit) < 10:
            candidates.append((eot, stops))
    assert candidates, "the test needs a token the rows emit at different steps"
    eot, stops = candidates[0]
    out = model.generate(prompts, 12, temperature=0, eot_id=eot)
    assert out.shape == (4, 17) and torch.equal(out[:, :5], prompts)
    listed = model.generate(list(prompts), 12, temperature=0, eot_id=eot)
    for row, stop in enumerate(stops):
        if stop is None:
            assert torch.equal(out[row, 5:], free[row]), f"row {row} must not stop"
            assert torch.equal(listed[row], out[row])
        else:
            assert torch.equal(out[row, 5 : 6 + stop], free[row, : stop + 1]), f"row {row} before its stop"
            assert (out[row, 6 + stop :] == eot).all(), f"row {row} must be padded with eot after its stop"
            assert torch.equal(listed[row], out[row, : 6 + stop]), "a list of prompts ends each at its eot"
    early = min(s for s in stops if s is not None)
    assert not (free[stops.index(early), early + 1 :] == eot).all(), "the padding must differ from free decoding"


def test_generation_ends_when_every_row_has_stopped():
    """Once every row has emitted end-of-text no further step runs, and the rest of the output is
    end-of-text: here row 1 stops at step 2 and row 0 at step 6 of 10."""
    model = build()
    prompt = tokens(2, 4, seed=2)
    free = model.generate(prompt, 10, temperature=0)[:, 4:]
    eot = 13
    assert [first_at(row, eot) for row in free] == [6, 2]
    steps = []
    counted = lambda token, state: steps.append(1) or model.decode_step(token, state)  # noqa: E731
    out = model.generate(prompt, 10, temperature=0, eot_id=eot, decode_step=counted)
    assert out.shape == (2, 14)
    assert torch.equal(out[0, 4:11], free[0, :7]) and (out[0, 11:] == eot).all()
    assert torch.equal(out[1, 4:7], free[1, :3]) and (out[1, 7:] == eot).all()
    assert len(steps) == 6, "a step for each token after the first, up to the last row's end"


def test_length_and_mode_errors():
    model = build()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(tokens(1, 60), max_new_tokens=5)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="routing='sideways' is invalid"):
        model(tokens(1, 4), routing="sideways")


def test_decode_throughput_counts_every_generated_token():
    model = build()
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 11, 7, 5)]
    figures = decode_throughput(model, prompts, new_tokens=6, reps=1)
    assert figures["batch"] == 4 and figures["new_tokens"] == 6
    assert figures["tokens_per_s"] == pytest.approx(4 * 6 / figures["seconds"])
