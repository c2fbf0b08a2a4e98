"""The distributions ``sample_next`` draws from: which tokens top-k and top-p keep, and how the
temperature spreads the mass over them, measured over many seeded draws on fixed logits.

Each setting draws ``N`` tokens from every row at once. A kept token's empirical frequency is a
binomial proportion with standard deviation ``sqrt(p (1 - p) / N)`` (at most 0.0025 here); it must
lie within 5 of them of the probability computed by hand below. A correct sampler misses that band
for one token in about two million, so with the fixed seeds the test is deterministic and would
pass for almost any other seed too; a temperature ignored or a filter one token too wide moves some
frequency by 0.03 or more, over ten times the band.
"""

import math

import pytest
import torch

from modlm.model.generate import sample_next

N = 40_000
BASE = [3.0, 2.6, 2.2, 1.8, 1.5, 1.2, 0.9, 0.5, 0.0, -0.5, -1.0, -2.0]
V = len(BASE)
# Row 1 holds the same scores in another order: every filter must act on its own row.
PERMUTATION = [7, 2, 11, 0, 5, 9, 1, 4, 10, 3, 8, 6]
LOGITS = torch.tensor([BASE, [BASE[PERMUTATION.index(i)] for i in range(V)]])


def expected(row: list[float], temperature: float, top_k=None, top_p=None) -> dict[int, float]:
    """The sampling distribution by hand: scores divided by the temperature; the ``top_k``
    highest kept; then, of those renormalised, the smallest prefix (by probability) whose mass
    reaches ``top_p``, i.e. every token whose predecessors hold less than ``top_p``."""
    z = {i: s / temperature for i, s in enumerate(row)}
    kept = sorted(z, key=lambda i: -z[i])[: top_k or V]
    norm = sum(math.exp(z[i]) for i in kept)
    if top_p is not None:
        mass, nucleus = 0.0, []
        for i in kept:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += math.exp(z[i]) / norm
        kept = nucleus
        norm = sum(math.exp(z[i]) for i in kept)
    return {i: math.exp(z[i]) / norm for i in kept}


def draw(temperature, top_k=None, top_p=None, seed=0) -> list[torch.Tensor]:
    """``N`` draws per row of ``LOGITS``, as token frequencies (one (V,) tensor per row)."""
    logits = LOGITS.repeat_interleave(N, dim=0)
    tokens = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    return [torch.bincount(tokens[r * N : (r + 1) * N], minlength=V).double() / N for r in range(len(LOGITS))]


def assert_distribution(freq: torch.Tensor, want: dict[int, float]) -> None:
    """Nothing outside ``want`` sampled, every token of it with p >= 1e-3 (40 expected draws)
    sampled, and each frequency within its band."""
    support = set(freq.nonzero().flatten().tolist())
    likely = {i for i, p in want.items() if p >= 1e-3}
    assert likely <= support <= set(want), f"sampled {sorted(support)}, the filter keeps {sorted(want)}"
    for i, p in want.items():
        band = 5 * math.sqrt(p * (1 - p) / N)
        assert abs(freq[i].item() - p) <= band, f"token {i}: frequency {freq[i].item():.4f}, probability {p:.4f}"


SETTINGS = [dict(top_k=5), dict(top_p=0.9), dict(top_k=5, top_p=0.9), dict()]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_filters_keep_their_tokens_and_the_temperature_spreads_them(settings, temperature):
    rows = draw(temperature, **settings)
    for row, freq in zip(LOGITS.tolist(), rows):
        want = expected(row, temperature, **settings)
        if settings:
            assert 1 < len(want) < V and min(want.values()) > 0.02, "a filter that keeps some likely tokens only"
        assert_distribution(freq, want)


def test_the_nucleus_and_the_top_token_follow_the_temperature():
    """What the bands above imply, stated outright: the cooler temperature concentrates the mass on
    the top token, and top-p keeps fewer tokens at 0.5 than at 2.0."""
    cold, hot = draw(0.5, top_p=0.9)[0], draw(2.0, top_p=0.9, seed=1)[0]
    assert len(expected(BASE, 0.5, top_p=0.9)) == 4 and len(expected(BASE, 2.0, top_p=0.9)) == 9
    assert (cold > 0).sum() == 4 and (hot > 0).sum() == 9
    assert cold[0] > 0.5 > 0.25 > hot[0]
