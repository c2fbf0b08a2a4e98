"""How evaluation reports the spending of depth: per-token depth histogram and routed-block overlap."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.analysis.evaluate import evaluate_routing


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_depth_histogram_and_overlap_agree_with_the_selections(routing):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, max_seq_len=16, route_every=2, capacity=0.25)
    model = MoDTransformer(cfg)
    batches = [torch.randint(0, 64, (3, 17)) for _ in range(2)]
    result = evaluate_routing(model, batches, routing)

    shares = [result[f"depth.{d}"] for d in range(cfg.n_layers + 1)]
    assert sum(shares) == pytest.approx(1.0)
    assert all(s == 0 for s in shares[:3])  # the 3 dense blocks see every token
    mean_depth = sum(d * s for d, s in enumerate(shares))
    used = sum(result[f"capacity_used.layer_{i}"] for i in cfg.routed_layers)
    assert mean_depth == pytest.approx(3 + used)

    # recount overlap from the model's own selections
    model.eval()
    with torch.no_grad():
        outs = [model(b[:, :-1], routing=routing).routing for b in batches]
    for n, layer in enumerate(cfg.routed_layers[:-1]):
        both = sum(int((o[n].selected & o[n + 1].selected).sum()) for o in outs)
        mine = sum(int(o[n].selected.sum()) for o in outs)
        assert result[f"overlap.layer_{layer}"] == pytest.approx(both / max(1, mine))
    assert f"overlap.layer_{cfg.routed_layers[-1]}" not in result  # the last routed block has no successor


def test_dense_model_passes_every_token_through_every_block():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, route_every=0)
    result = evaluate_routing(MoDTransformer(cfg), [torch.randint(0, 64, (2, 17))], "topk")
    assert result["depth.4"] == 1.0 and not any(k.startswith("overlap") for k in result)
