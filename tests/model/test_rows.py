"""Rows that come and go (``RowPool``): requests joining a running batch between steps and leaving
it decode what each decodes alone, for every kind of routed cache and decision state: the same
tokens, and logits equal up to the rounding of matrix products, which CPU kernels choose by the
number of rows (a batch of 1 and of 4 round differently; the caches and decisions are the same)."""

import pytest
import torch

from modlm.model.rows import RowPool
from tests.helpers.models import tiny_model

V = 61
# a larger init: continuations vary, so greedy decoding really tests something
MODEL = dict(vocab_size=V, max_seq_len=40, capacity=0.5, init_std=0.3)
VARIANTS = {
    "mod": {},  # controlled causal decision: a threshold per row
    "dense": dict(route_every=0),
    "predictor": dict(causal_method="predictor"),
    "standardized": dict(decision_logit="standardized_router"),  # router moments per row
    "experts": dict(route_every=0, n_experts=4),
    "recursion": dict(route_every=0, recursions=2),
    # reads cached positions; a first step that skips tokens leaves entries older than a later token
    "recursion_shared_kv": dict(route_every=0, recursions=2, recursion_kv="shared", recursion_capacities=[0.5, 0.5]),
    "recursion_token_choice": dict(route_every=0, recursions=2, recursion_routing="token_choice"),
}


def requests(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    news = torch.randint(3, 10, (n,), generator=g).tolist()
    return [torch.randint(0, V, (length,), generator=g) for length in lengths], news


@torch.no_grad()
def alone(model, prompt, new):
    """The logits of each step of ``prompt``'s greedy continuation, decoded in a state of its own."""
    state = model.new_state(1)
    logits = [model.prefill(prompt.unsqueeze(0), state, last_only=True)[0]]
    while len(logits) < new:
        logits.append(model.decode_step(logits[-1].argmax().view(1), state)[0])
    return torch.stack(logits)


@torch.no_grad()
def serve(model, prompts, news, capacity=3, join_every=2, chunk=4):
    """The logits of each step of every prompt's greedy continuation, decoded as a server does: a
    request starts every ``join_every`` steps while a row is free, its prompt prefilled ``chunk``
    tokens between two steps of the running rows, then joins them; each leaves when it has its
    tokens, the others keep decoding."""
    pool = RowPool(model.new_state(capacity))
    waiting, rows, out, step, filling = list(range(len(prompts))), {}, [[] for _ in prompts], 0, None
    while waiting or rows or filling:
        if filling is None and waiting and pool.running < capacity and step % join_every == 0:
            filling = waiting.pop(0), model.new_state(1)
        if filling is not None:
            i, one = filling
            fed = int(one.seen[0])
            logits = model.prefill(prompts[i][fed : fed + chunk].unsqueeze(0), one, last_only=True)
            if fed + chunk >= len(prompts[i]):
                rows[pool.join(one)] = i
                out[i].append(logits[0])
                filling = None
        step += 1
        done = [r for r, i in rows.items() if len(out[i]) >= news[i]]
        if done:
            moved = pool.release(done)
            rows = {moved.get(r, r): i for r, i in rows.items() if r not in done}
        if rows:
            assert sorted(rows) == list(range(pool.running))
            tokens = torch.stack([out[rows[r]][-1].argmax() for r in range(pool.running)])
            logits = model.decode_step(tokens, pool.state)
            for r, i in rows.items():
                out[i].append(logits[r])
    return [torch.stack(steps) for steps in out]


def check(model, prompts, news, **how):
    served = serve(model, prompts, news, **how)
    for prompt, new, logits in zip(prompts, news, served):
        torch.testing.assert_close(logits, alone(model, prompt, new), rtol=0, atol=1e-4)
        generated = model.generate(prompt, max_new_tokens=new, temperature=0)[len(prompt) :]
        assert torch.equal(logits.argmax(-1), generated)
    assert sum(len(set(steps.argmax(-1).tolist())) for steps in served) > 2 * len(served), (
        "continuations must vary for this to test decoding"
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_joining_and_leaving_rows_decode_what_each_decodes_alone(variant):
    check(tiny_model(**MODEL, **VARIANTS[variant]), *requests())


@pytest.mark.parametrize("variant", ["mod", "recursion_shared_kv"])
def test_a_row_taken_after_a_longer_request_sees_nothing_of_it(variant):
    """A long request ends while another keeps decoding, and short ones take its row: the entries the
    long one left past their ends are never read (recursive KV sharing reads cached positions)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (14, 12, 1, 2)]
    check(tiny_model(**MODEL, **VARIANTS[variant]), prompts, [4, 24, 12, 10], capacity=2, join_every=1)


def test_rows_move_into_the_places_of_rows_that_leave():
    model = tiny_model(**MODEL)
    pool = RowPool(model.new_state(4))
    for length in (3, 5, 2, 4):
        one = model.new_state(1)
        model.prefill(torch.arange(length).unsqueeze(0), one)
        pool.join(one)
    assert pool.state.seen.tolist() == [3, 5, 2, 4] and pool.state.filled == 5
    assert pool.release([0, 2]) == {3: 0}  # the last row fills the first hole; row 1 stays
    assert pool.running == 2 and pool.state.seen.tolist() == [4, 5] and pool.state.filled == 5
    assert pool.release([0, 1]) == {} and pool.state is None
