"""Mixture metrics on hand-made routing decisions, where every figure can be counted by eye."""

import pytest
import torch

from modlm import ModelConfig
from modlm.analysis.metrics import (
    add_tallies,
    decision_counts,
    figures,
    quality_from_counts,
    router_decision_counts,
    tally,
    token_depth,
)
from modlm.model.recursion import RecursionInfo
from modlm.model.routing import RoutingInfo

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=4, n_heads=2, max_seq_len=8)


def info(layer, selected, topk, predictor=None, eligible=None):
    selected = torch.tensor(selected, dtype=torch.bool)
    router = torch.where(selected, 1.0, -1.0)
    return RoutingInfo(
        layer=layer,
        selected=selected,
        router_logits=router,
        predictor_logits=None if predictor is None else torch.tensor(predictor),
        topk=torch.tensor(topk, dtype=torch.bool),
        aux_losses={},
        aux_loss=torch.zeros(()),
        eligible=None if eligible is None else torch.tensor(eligible, dtype=torch.bool),
    )


def test_capacity_and_decision_counts():
    # predictor says yes at positions 0, 1; top-k picked 1, 2: 2 of 4 agree, 1 true positive
    a = info(1, [[1, 0, 0, 0]], [[0, 1, 1, 0]], predictor=[[2.0, 3.0, -1.0, -4.0]])
    assert router_decision_counts(a).tolist() == [2, 4, 1, 2, 2]
    assert quality_from_counts(router_decision_counts(a)) == {
        "causal_acc": 0.5,
        "causal_precision": 0.5,
        "causal_recall": 0.5,
    }
    found = figures(tally([a], CFG))["router"]
    assert found["capacity_used.layer_1"] == 0.25 and found["causal_acc.layer_1"] == 0.5
    # without a predictor the router's own logits decide: they follow `selected` here
    b = info(3, [[1, 0, 0, 0]], [[1, 0, 0, 0]])
    assert quality_from_counts(router_decision_counts(b))["causal_acc"] == 1.0
    assert decision_counts(torch.tensor([True, False]), torch.tensor([True, True])).tolist() == [1, 2, 1, 1, 2]


def test_random_routing_reports_no_decision_figures():
    a = info(1, [[1, 0, 0, 0]], [[0, 1, 1, 0]])
    found = figures(tally([a], ModelConfig(**{**CFG.to_dict(), "random_routing": True})))["router"]
    assert "capacity_used.layer_1" in found and not any(k.startswith("causal_") for k in found)


def test_depth_and_selection_figures():
    a = info(1, [[1, 1, 0, 0]], [[1, 1, 0, 0]])
    b = info(3, [[0, 1, 1, 0]], [[0, 1, 1, 0]])
    assert token_depth([a, b], CFG).tolist() == [[3, 4, 3, 2]]  # 2 dense blocks + picks
    assert token_depth([], CFG) == 4  # nothing routed: every block
    ids = torch.tensor([[7, 0, 7, 7]])
    stats = figures(tally([a, b], CFG, ids, eot_id=0))["router"]
    assert stats["capacity_used.layer_1"] == 0.5 and stats["capacity_used.layer_3"] == 0.5
    assert stats["selected_first.layer_1"] == 1.0 and stats["selected_first.layer_3"] == 0.0
    assert stats["overlap.layer_1"] == 0.5 and "overlap.layer_3" not in stats  # the last block has no next one
    assert stats["selected_eot.layer_1"] == pytest.approx(0.5) and stats["selected_eot.layer_3"] == pytest.approx(0.5)


def test_figures_are_ratios_of_sums_over_batches():
    # 1 of 4 processed, then 4 of 4: the share over both batches is 5 / 8, not the mean of 1/4 and 1
    first = tally([info(1, [[1, 0, 0, 0]], [[1, 0, 0, 0]])], CFG)
    second = tally([info(1, [[1, 1], [1, 1]], [[1, 1], [1, 1]])], CFG)
    assert figures(add_tallies(first, second))["router"]["capacity_used.layer_1"] == 5 / 8


def test_recursion_figures_count_each_step_among_the_tokens_it_chose_from():
    # step 0 keeps 3 of 4 tokens; step 1 chooses among those 3 and keeps 1. Step 1's predictor says
    # yes at positions 1 and 3: position 3 already exited, so only position 1 is graded (a miss)
    first = info(0, [[1, 1, 1, 0]], [[1, 1, 1, 0]], predictor=[[1.0, 1.0, 1.0, -1.0]])
    second = info(1, [[0, 0, 1, 0]], [[0, 0, 1, 0]], predictor=[[-1.0, 1.0, -1.0, 1.0]], eligible=[[1, 1, 1, 0]])
    recursion = RecursionInfo([first, second])
    found = figures(tally([recursion], CFG))["recursion"]
    assert found["capacity_used.step_0"] == 0.75 and found["capacity_used.step_1"] == 0.25
    assert found["causal_acc.step_0"] == 1.0 and found["causal_acc.step_1"] == pytest.approx(1 / 3)
    assert found["causal_precision.step_1"] == 0.0 and found["causal_recall.step_1"] == 0.0
    assert recursion.depth.tolist() == [[1, 1, 2, 0]]
    assert [found[f"depth_share.depth_{d}"] for d in range(3)] == [0.25, 0.5, 0.25]
    assert found["depth_mean"] == 1.0


def test_token_choice_steps_without_topk_report_shares_but_no_decision():
    # a recursion step whose depth was decided up front has no top-k to grade its decision against
    step = RoutingInfo(
        layer=0,
        selected=torch.tensor([[True, False]]),
        router_logits=torch.ones(1, 2),
        predictor_logits=None,
        topk=None,
        aux_losses={},
        aux_loss=torch.zeros(()),
    )
    found = figures(tally([RecursionInfo([step])], CFG))["recursion"]
    assert found["capacity_used.step_0"] == 0.5 and not any(k.startswith("causal_") for k in found)


def test_expert_shares_add_up_over_batches():
    """Picks of 2 real and 2 no-op experts: the shares over two batches are those of all their picks."""
    from modlm.model.moe import ExpertInfo

    def expert(picks):
        picks = torch.tensor([picks]).unsqueeze(-1)  # (1, n, top-1)
        return ExpertInfo(
            layer=0,
            n_experts=2,
            n_choices=4,
            expert=picks,
            computed=picks < 2,
            valid=None,
            slots_per_expert=None,
            load_balance=None,
            aux_loss=torch.zeros(()),
        )

    cfg = ModelConfig(**{**CFG.to_dict(), "n_experts": 2, "noop_experts": 2, "route_every": 0})
    total = add_tallies(tally([expert([0, 0, 2, 3])], cfg), tally([expert([1, 0, 0, 0])], cfg))
    found = figures(total)["moe"]
    assert found["load.layer_0.expert_0"] == 5 / 8 and found["load.layer_0.expert_1"] == 1 / 8
    assert found["noop_fraction.layer_0"] == 2 / 8 and found["expert_slots.layer_0"] == 6 / 2
