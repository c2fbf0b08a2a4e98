"""lm-evaluation-harness's model interface on modlm models (``ModLMHarness``), request by request:
the same numbers as lm-eval's own ``hf`` model on a dense model's transformers export, the same
numbers at any batch size, causal scores that obey the chain rule where top-k's do not (the
continuation leaks into the routing), generation that stops at the stop strings and gives the text
``model.generate`` gives, and the tally of what each routed block processed.

The models have random weights of a large spread (0.2), so their predictions vary from token to
token and their greedy text is not one token repeated.
"""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from modlm.analysis.flops import dense_twin, forward_flops
from modlm.analysis.harness.lm import ModLMHarness
from modlm.analysis.harness.usage import units
from modlm.model.transformer import MoDTransformer
from tests.helpers.harness_tasks import STDLIB, harness_model, harness_tokenizer

CONTEXT = "def read_config(path):\n    with open(path) as f:\n        return"
CONTINUATIONS = [" json.load(f)", " f.read()", " None", " yaml.safe_load(f.read())"]


@pytest.fixture(scope="module")
def tokenizer():
    return harness_tokenizer()


def build(routed: bool, seed: int = 0) -> MoDTransformer:
    return harness_model(routed, seed)


def requests(kind: str, args: list[tuple], task: str = "t") -> list[Instance]:
    return [Instance(kind, {}, a, i, (task, i, 1)) for i, a in enumerate(args)]


def stdlib_text(index: int, chars: int) -> str:
    return sorted(STDLIB.glob("*.py"))[index].read_text()[:chars]


def scoring_requests():
    """Log-likelihood requests (an empty context among them) and rolling ones (one longer than the
    48-token context: several windows)."""
    pairs = [(CONTEXT, c) for c in CONTINUATIONS] + [("", "import os"), ("x = 1\n", "y = x + 1")]
    rolling = [(stdlib_text(3, 400),), (stdlib_text(5, 60),)]
    return requests("loglikelihood", pairs), requests("loglikelihood_rolling", rolling)


@pytest.mark.slow  # importing lm-eval's hf model (transformers, accelerate) takes seconds
def test_dense_model_scores_what_lm_evals_hf_model_scores_on_its_export(tokenizer, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model = build(routed=False)
    assert model.to_hf(tmp_path / "hf", tokenizer=tokenizer) == "standard"
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1, dtype="float32")
    ours = ModLMHarness(model, tokenizer, batch_size=3)
    pairs, rolling = scoring_requests()
    want, got = theirs.loglikelihood(pairs, disable_tqdm=True), ours.loglikelihood(pairs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-6, abs=1e-4)
    assert len({round(lp, 3) for lp, _ in got}) == len(got)  # the model tells the continuations apart
    want = theirs.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_dense_model_generates_what_lm_evals_hf_model_generates(tokenizer, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model = build(routed=False)
    model.to_hf(tmp_path / "hf", tokenizer=tokenizer)
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=2, dtype="float32")
    asks = requests(
        "generate_until", [(stdlib_text(i, 80 + 20 * i), {"until": ["\n", "e"], "max_gen_toks": 12}) for i in range(4)]
    )
    got = ModLMHarness(model, tokenizer, batch_size=3).generate_until(asks)
    assert got == theirs.generate_until(asks, disable_tqdm=True)
    assert len(set(got)) > 1


@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_batching_gives_the_numbers_of_batch_size_one(tokenizer, routing):
    model = build(routed=True)
    pairs, rolling = scoring_requests()
    asks = requests("generate_until", [(stdlib_text(i, 60), {"until": ["\n\n"], "max_gen_toks": 6}) for i in range(4)])
    runs = {}
    for size in (1, 4):
        lm = ModLMHarness(model, tokenizer, routing=routing, batch_size=size)
        runs[size] = (
            lm.loglikelihood(pairs),
            lm.loglikelihood_rolling(rolling),
            lm.generate_until(asks),
            lm.usage.tasks["t"],
        )
    (ll1, roll1, gen1, use1), (ll4, roll4, gen4, use4) = runs[1], runs[4]
    assert [g for _, g in ll4] == [g for _, g in ll1]
    assert [lp for lp, _ in ll4] == pytest.approx([lp for lp, _ in ll1], rel=1e-5)
    assert roll4 == pytest.approx(roll1, rel=1e-5)
    assert gen4 == gen1
    assert use4.tokens == use1.tokens and use4.processed == use1.processed  # padding is never counted


def chain_gap(lm: ModLMHarness, context: list[int], first: list[int], second: list[int]) -> float:
    """log p(first + second | context) - log p(first | context) - log p(second | context + first)."""
    rows = [(("", ""), context, first + second), (("", ""), context, first), (("", ""), context + first, second)]
    whole, a, b = (lp for lp, _ in lm._loglikelihood_tokens(rows))
    return whole - a - b


def test_causal_scores_obey_the_chain_rule_and_topk_scores_leak(tokenizer):
    """Causal routing decides each token from the tokens up to it: scoring a continuation whole or in
    two parts gives the same log-probability. Top-k routing ranks the whole string, so appending the
    second part changes how the context and the first part are processed: whether it changes them for
    one string depends on the string, so eight seeded random ones (the same wherever the tests run,
    unlike the standard library's files), and most of them leak."""
    model = build(routed=True)
    strings = torch.randint(1, 400, (8, 34), generator=torch.Generator().manual_seed(7)).tolist()
    causal = ModLMHarness(model, tokenizer, routing="causal")
    topk = ModLMHarness(model, tokenizer, routing="topk")
    dense = ModLMHarness(build(routed=False), tokenizer, routing="topk")  # nothing routed: nothing to leak
    assert dense.mode.name == "causal" and not dense.mode.leaks
    leaks = 0
    for ids in strings:
        context, first, second = ids[:20], ids[20:26], ids[26:34]
        assert chain_gap(causal, context, first, second) == pytest.approx(0, abs=1e-4)
        assert chain_gap(dense, context, first, second) == pytest.approx(0, abs=1e-4)
        leaks += abs(chain_gap(topk, context, first, second)) > 0.05
    assert leaks >= 5  # six do here


@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_generation_stops_at_a_stop_string_with_the_text_model_generate_gives(tokenizer, routing):
    model = build(routed=True)
    prompt = stdlib_text(2, 40)
    ids = tokenizer.encode(prompt).ids
    lm = ModLMHarness(model, tokenizer, routing=routing)
    free = model.generate(ids, 16, temperature=0, eot_id=lm.eot_token_id, routing=routing)[len(ids) :].tolist()
    text = tokenizer.decode(free)
    stop = text[6:8]  # a stop string the greedy continuation does reach, a few tokens in
    assert stop and stop in text and len(set(free)) > 2
    [got] = lm.generate_until(requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 16})]))
    assert got == text[: text.index(stop)]
    usage = lm.usage.tasks["t"]
    assert usage.tokens < len(ids) + 15  # it stopped there: fewer tokens fed than the 16 it was allowed
    # what the routed blocks processed while generating: the decisions of one pass over what was fed
    out = model(torch.tensor([(ids + free)[: usage.tokens]]), routing=routing)
    counts = {f"layer_{info.layer}": int(info.selected.sum()) for info in out.routing}
    assert usage.processed == counts and 0 < counts["layer_1"] < usage.tokens
    assert usage.flops == forward_flops(model.config, usage.tokens, tokens_per_routed_block=list(counts.values()))
    [whole] = lm.generate_until(requests("generate_until", [(prompt, {"until": ["\x00"], "max_gen_toks": 16})]))
    assert whole == text


def test_tally_counts_what_each_routed_block_processed(tokenizer):
    model = build(routed=True)
    pairs, _ = scoring_requests()
    causal = ModLMHarness(model, tokenizer, routing="causal", batch_size=4)
    causal.loglikelihood(pairs)
    want_tokens, want_flops, want = 0, 0.0, {name: 0 for name in units(model.config)}
    for request in pairs:  # each row alone, straight from the model's own routing
        context, continuation = request.args
        row = (
            causal._encode_pair(context, continuation)
            if context
            else ([causal.eot_token_id], causal.tok_encode(continuation))
        )
        ids = torch.tensor([(row[0] + row[1])[-49:][:-1]])  # the last 48 tokens before the final one, as scored
        out = model(ids, routing="causal")
        want_tokens += ids.numel()
        row = [int(info.selected.sum()) for info in out.routing]
        for info, n in zip(out.routing, row):
            want[f"layer_{info.layer}"] += n
        want_flops += forward_flops(model.config, ids.numel(), tokens_per_routed_block=row)
    usage = causal.usage.tasks["t"]
    assert usage.tokens == want_tokens and usage.processed == want
    assert usage.flops == pytest.approx(want_flops, rel=1e-12)
    figures = causal.usage.figures(usage)
    assert figures["capacity_used.layer_1"] == want["layer_1"] / want_tokens
    assert 0.1 < figures["capacity_used"] < 0.9

    topk = ModLMHarness(model, tokenizer, routing="topk", batch_size=4)
    topk.loglikelihood(pairs)
    lengths = [
        min(48, sum(map(len, causal._encode_pair(*r.args))) - 1) if r.args[0] else len(causal.tok_encode(r.args[1]))
        for r in pairs
    ]
    assert topk.usage.tasks["t"].processed["layer_3"] == sum(model.config.topk_tokens(n, 0.5) for n in lengths)
    # top-k: every row at its own length, each routed block at its k (forward_flops' default)
    flops = topk.usage.figures(topk.usage.tasks["t"])["flops_per_token"]
    assert flops == pytest.approx(sum(forward_flops(model.config, n) for n in lengths) / sum(lengths), rel=1e-12)
    assert flops < sum(forward_flops(dense_twin(model.config), n) for n in lengths) / sum(lengths)
