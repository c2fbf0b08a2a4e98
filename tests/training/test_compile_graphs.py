"""Compiled training (``--model.compile``: every block compiled, as ``parallelize`` does it): each kind
of block is one graph, with no graph break, shared by every block of its kind however deep the
model, and never recompiled by new data. A block whose graph depended on where it sits would need
a graph per block and, past dynamo's recompile limit (8), run uncompiled without a word.

Dynamo's own counters are read; the graphs are captured with the ``eager`` backend (what dynamo
traces is the same for every backend, and tracing is fast)."""

import pytest
import torch
from torch._dynamo.utils import counters

from modlm import ModelConfig, MoDTransformer

VARIANTS = {
    "mod": (dict(route_every=2), 2),
    "dense": (dict(route_every=0), 1),
    "moe": (dict(route_every=0, n_experts=4), 1),
    "staged-mode": (dict(route_every=2, n_experts=4), 2),
    "integrated-mode": (dict(route_every=0, n_experts=3, noop_experts=3), 1),
    "every-block-routed": (dict(route_every=1, causal_method="router"), 1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_kind_of_block_is_one_graph_for_every_depth_and_every_batch(variant):
    overrides, kinds = VARIANTS[variant]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=10, n_heads=2, max_seq_len=32, capacity=0.25, **overrides)
    model = MoDTransformer(cfg)
    for block in model.blocks:
        block.compile(backend="eager")
    for step in range(3):  # new data every step: no recompilation
        idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(step))
        out = model(idx, routing="topk", targets=idx)
        (out.loss + out.aux_loss).backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == kinds, dict(counters["stats"])
    assert [info.layer for info in out.routing] == cfg.routed_layers  # the model names the blocks
