"""The edges of the decoding interface: prompt forms, padding at the end of the context, a full
row given a padding token, sampling settings that mean nothing, autograd, and the predictor's
precision under autocast."""

import pytest
import torch

from modlm.model.config import STATIC
from modlm.model.errors import UserError
from tests.helpers.models import random_tokens, tiny_model

V = 61
# a 16-token context, whose end a few tokens reach; a larger init: continuations vary, so greedy decoding
# really tests something
MODEL = dict(vocab_size=V, max_seq_len=16, capacity=0.5, init_std=0.3)


def test_a_one_dimensional_prompt_is_one_prompt():
    model = tiny_model(**MODEL)
    prompt = random_tokens(5, vocab=V)
    out = model.generate(prompt, max_new_tokens=4, temperature=0)
    assert out.shape == (9,) and torch.equal(out[:5], prompt)
    assert torch.equal(out, model.generate(prompt.unsqueeze(0), max_new_tokens=4, temperature=0)[0])
    assert torch.equal(out, model.generate(prompt.tolist(), max_new_tokens=4, temperature=0))
    assert len(set(out[5:].tolist())) > 1, "continuations must vary for this to test decoding"
    with pytest.raises(UserError, match="shape"):
        model.generate(prompt.view(1, 1, 5), max_new_tokens=1)


def test_padding_at_the_end_of_the_context_is_neither_indexed_nor_cached():
    """Rows of 15 and 16 real tokens in a 16-token context, padded to 17 on a state that has one
    token: every real token fits, the padding's position would be past the rotary table."""
    model = tiny_model(**MODEL)
    state = model.new_state(2)
    model.prefill(random_tokens(1, seed=3, vocab=V).unsqueeze(0).expand(2, 1), state)
    batch = torch.stack([random_tokens(15, seed=4, vocab=V), random_tokens(15, seed=5, vocab=V)])
    batch = torch.cat([batch, torch.zeros(2, 1, dtype=torch.long)], dim=1)  # padding at index 15
    logits = model.prefill(batch, state, n_real=torch.tensor([14, 15]), last_only=True)
    assert state.seen.tolist() == [15, 16] and state.filled == 16 and torch.isfinite(logits).all()
    alone = model.new_state(1)
    full = model.prefill(torch.cat([random_tokens(1, seed=3, vocab=V), batch[1, :15]]).unsqueeze(0), alone)
    torch.testing.assert_close(logits[1], full[0, -1], rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="max_seq_len"):
        model.prefill(batch[:, :2], state)


def test_a_full_row_given_a_skipped_token_keeps_its_entries():
    """Static decoding writes a row whose routed block says no into the spare slot: a row whose
    cache is full (max_seq_len entries) must keep every entry."""
    model = tiny_model(**MODEL, causal_method="router")
    routed = model.routed_blocks()
    state = model.new_state(1)
    model.prefill(random_tokens(15, seed=6, vocab=V).unsqueeze(0), state)
    for block in routed:  # from here on every routed block says no
        torch.nn.init.constant_(block.router.weight, 0.0)
        block.router.weight.data[0, 0] = -1e4
    cache = state.caches[routed[0].layer]
    n = int(cache.length[0])
    cache.length.fill_(model.config.max_seq_len)  # as if the row were full
    before = cache.k[0, :, : model.config.max_seq_len].clone()
    model.decode_step(random_tokens(1, seed=7, vocab=V), state, STATIC)
    assert torch.equal(cache.k[0, :, : model.config.max_seq_len], before), "an entry was overwritten"
    assert int(cache.length[0]) == model.config.max_seq_len and n > 0


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=-3), "top_k=-3"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(temperature=float("nan")), "temperature=nan"),
    ],
)
def test_meaningless_sampling_settings_are_refused_by_name(settings, match):
    with pytest.raises(UserError, match=match):
        tiny_model(**MODEL).generate(random_tokens(3, vocab=V), max_new_tokens=2, **settings)


def test_decoding_runs_without_autograd():
    """Prefill and decode steps keep no graph, even outside ``torch.no_grad``: the cache would
    join it and memory would grow every step."""
    model = tiny_model(**MODEL).train(False)
    assert all(p.requires_grad for p in model.parameters())
    state = model.new_state(1)
    logits = model.prefill(random_tokens(4, vocab=V).unsqueeze(0), state)
    step = model.decode_step(random_tokens(1, vocab=V), state)
    assert not logits.requires_grad and not step.requires_grad
    assert not any(t.requires_grad for c in state.caches for t in (c.k, c.v))


def test_routers_and_predictors_decide_in_fp32_under_bf16_autocast():
    model = tiny_model(**MODEL, causal_method="predictor")
    x = torch.randn(2, 8, 32)
    router = model.routers()[0]
    want_r, want_p = router.scores(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, p = router.scores(x)
    assert r.dtype == p.dtype == torch.float32
    torch.testing.assert_close(p, want_p, rtol=0, atol=0)
    torch.testing.assert_close(r, want_r, rtol=0, atol=0)
