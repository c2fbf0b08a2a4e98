"""Routing metrics on hand-made routing decisions, where every figure can be counted by eye."""
import pytest
import torch

from modlm.analysis.metrics import (capacity_used, decision_counts, overlap_counts, quality_from_counts, selection_figures,
                           token_depth)
from modlm.model.routing import RoutingInfo


def info(layer, selected, topk, predictor=None):
    selected = torch.tensor(selected, dtype=torch.bool)
    router = torch.where(selected, 1.0, -1.0)
    return RoutingInfo(layer=layer, selected=selected, router_logits=router,
                       predictor_logits=None if predictor is None else torch.tensor(predictor),
                       topk=torch.tensor(topk, dtype=torch.bool), aux_losses={}, aux_loss=torch.zeros(()))


def test_capacity_and_decision_counts():
    # predictor says yes at positions 0, 1; top-k picked 1, 2: 2 of 4 agree, 1 true positive
    a = info(1, [[1, 0, 0, 0]], [[0, 1, 1, 0]], predictor=[[2.0, 3.0, -1.0, -4.0]])
    assert capacity_used(a).item() == 0.25
    assert decision_counts(a).tolist() == [2, 4, 1, 2, 2]
    assert quality_from_counts(decision_counts(a)) == {"causal_acc": 0.5, "causal_precision": 0.5, "causal_recall": 0.5}
    # without a predictor the router's own logits decide: they follow `selected` here
    b = info(3, [[1, 0, 0, 0]], [[1, 0, 0, 0]])
    assert quality_from_counts(decision_counts(b))["causal_acc"] == 1.0


def test_depth_and_selection_figures():
    a = info(1, [[1, 1, 0, 0]], [[1, 1, 0, 0]])
    b = info(3, [[0, 1, 1, 0]], [[0, 1, 1, 0]])
    assert token_depth([a, b], n_layers=4).tolist() == [[3, 4, 3, 2]]  # 2 dense blocks + picks
    ids = torch.tensor([[7, 0, 7, 7]])
    stats = selection_figures([a, b], ids, eot_id=0)
    assert stats["capacity_used"] == {1: 0.5, 3: 0.5} and stats["selected_first"] == {1: 1.0, 3: 0.0}
    assert overlap_counts(a, b).tolist() == [1, 2]
    assert stats["overlap"] == {1: 0.5}
    assert stats["selected_eot"] == {1: pytest.approx(0.5), 3: pytest.approx(0.5)}


def test_recursion_figures_count_each_step_among_the_tokens_it_chose_from():
    from modlm.analysis.metrics import depth_shares, recursion_figures
    from modlm.model.recursion import RecursionInfo

    # step 0 keeps 3 of 4 tokens; step 1 chooses among those 3 and keeps 1. Step 1's predictor says
    # yes at positions 1 and 3: position 3 already exited, so only position 1 is graded (a miss)
    first = info(0, [[1, 1, 1, 0]], [[1, 1, 1, 0]], predictor=[[1.0, 1.0, 1.0, -1.0]])
    second = info(1, [[0, 0, 1, 0]], [[0, 0, 1, 0]], predictor=[[-1.0, 1.0, -1.0, 1.0]])
    figures = recursion_figures(RecursionInfo([first, second]))
    assert figures["capacity_used"] == {0: 0.75, 1: 0.25}
    assert figures["causal_acc"] == {0: 1.0, 1: pytest.approx(1 / 3)}
    assert figures["causal_precision"][1] == 0.0 and figures["causal_recall"][1] == 0.0
    assert RecursionInfo([first, second]).depth.tolist() == [[1, 1, 2, 0]]
    assert depth_shares(RecursionInfo([first, second])) == [0.25, 0.5, 0.25]
