"""Grouped-query attention under a mask (a prompt or a decoding step over a KV cache, a recursion step
reading shared keys): on CUDA each key/value head's query heads are folded into its query rows, so
SDPA runs with equal head counts and no ``enable_gqa`` (which would keep it on the math kernel); on
the CPU ``enable_gqa`` stays.

No GPU here: the folded path is chosen by ``fold_query_groups``, which the tests switch on as CUDA
would. They check the SDPA calls it makes (arguments only: which kernel CUDA picks is torch's) and
that it computes what an independent reference computes."""

import math

import pytest
import torch
import torch.nn.functional as F

from modlm import ModelConfig, MoDTransformer
from modlm.model import layers
from modlm.model.config import STATIC, DecodePolicy
from modlm.model.layers import masked_attention

V = 97


def reference(q, k, v, mask):
    """Attention written out: every query head against its key/value head, scores masked, softmax."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


@pytest.fixture
def as_on_cuda(monkeypatch):
    monkeypatch.setattr(layers, "fold_query_groups", lambda device: True)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call's (query heads, key heads, value heads, masked, keyword arguments)."""
    calls, original = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.size(1), k.size(1), v.size(1), kwargs.get("attn_mask") is not None, kwargs))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("fold", [True, False], ids=["folded (CUDA)", "enable_gqa (CPU)"])
@pytest.mark.parametrize("batch, new, keys", [(3, 1, 17), (2, 5, 11)], ids=["decoding step", "prompt"])
def test_grouped_attention_under_a_mask_is_attention(monkeypatch, fold, batch, new, keys):
    monkeypatch.setattr(layers, "fold_query_groups", lambda device: fold)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, new, 8, 16, generator=g).transpose(1, 2)  # as the projection lays it out
    k, v = torch.randn(2, batch, 2, keys, 16, generator=g)
    mask = torch.rand(batch, 1, new, keys, generator=g) > 0.5
    mask[..., 0] = True  # every query sees a key
    torch.testing.assert_close(masked_attention(q, k, v, mask), reference(q, k, v, mask))


MODELS = {
    "mod": dict(route_every=2, recursions=1, n_layers=4),
    "mor-shared-kv": dict(
        route_every=0,
        recursions=3,
        recursion_kv="shared",
        causal_method="router",
        recursion_sharing="cycle",
        n_layers=6,
    ),
}


HOST = DecodePolicy(host_decides=True, bounded_reads=True)


@pytest.mark.parametrize("policy", [HOST, STATIC], ids=["host", "static"])
@pytest.mark.parametrize("model", list(MODELS))
@torch.no_grad()
def test_folded_decoding_equals_the_causal_forward_without_a_grouped_flag(as_on_cuda, sdpa_calls, model, policy):
    """A prompt and decoding steps through every masked path (a cache, shared keys), against the
    causal forward over the whole sequence, which runs without a mask."""
    torch.manual_seed(0)
    net = MoDTransformer(
        ModelConfig(vocab_size=V, d_model=64, n_heads=8, n_kv_heads=2, max_seq_len=32, init_std=0.3, **MODELS[model])
    ).eval()
    idx = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    full = net(idx, routing="causal").logits
    sdpa_calls.clear()
    state = net.new_state(3)
    steps = [net.prefill(idx[:, :5], state)]
    steps += [net.decode_step(idx[:, t], state, policy).unsqueeze(1) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5 * float(full.abs().max()))
    masked = [call for call in sdpa_calls if call[3]]
    assert len(masked) >= 8, "the test must see the prompt's and every step's masked calls"
    assert all(q == k == v == 2 and "enable_gqa" not in kwargs for q, k, v, _, kwargs in masked), masked[:3]
