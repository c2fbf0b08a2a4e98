"""The inference budget: calibrated thresholds and the controlled decision keep a routed block at its
capacity, stay strictly causal, and decode with the KV cache exactly as one causal pass computes."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.model.config import STATIC, DecodePolicy
from modlm.model.routing import RoutedBlock
from tests.helpers.models import random_tokens, tiny_model

T = 48
DECISIONS = [
    ("plain", "trained"),
    ("calibrated", "trained"),
    ("controlled", "trained"),
    ("controlled", "standardized_router"),
    ("calibrated", "standardized_router"),
]


def shares(out) -> list[float]:
    return [info.selected.float().mean().item() for info in out.routing]


def test_calibration_makes_the_held_out_share_the_capacity():
    model = tiny_model(init_std=0.3, causal_decision="calibrated")
    held_out = random_tokens(8, T, seed=5)
    plain = shares(model(held_out, routing="causal"))  # thresholds 0: whatever the predictor says
    thresholds = model.calibrate(held_out)
    assert len(thresholds) == 2 and thresholds == [float(b.router.decision.threshold) for b in model.routed_blocks()]
    assert shares(model(held_out, routing="causal")) == [0.25, 0.25]  # exactly k of every block's tokens
    assert plain != [0.25, 0.25], "the test needs a model whose plain decision is off the capacity"
    other = shares(model(random_tokens(8, T, seed=6), routing="causal"))
    assert all(abs(s - 0.25) < 0.06 for s in other)  # other windows: about the capacity


def test_the_controller_holds_the_share_where_the_plain_decision_drifts():
    """Logits pushed far above the threshold (a shifted router, as text that looks unlike the
    calibration windows): the plain decision processes every token, the controlled one holds its
    running share within a few percent of the capacity."""
    model = tiny_model(init_std=0.3, causal_method="router")
    model.calibrate(random_tokens(8, T, seed=5))
    torch.manual_seed(3)
    for block in model.blocks:
        if isinstance(block, RoutedBlock):
            block.router.weight.data += (
                2 * block.router.weight.data.abs().mean() * torch.sign(torch.randn_like(block.router.weight))
            )
    idx = random_tokens(4, 64, seed=7)
    drifting = shares(model.reconfigured(causal_decision="calibrated")(idx, routing="causal"))
    held = shares(model.reconfigured(causal_decision="controlled")(idx, routing="causal"))
    assert max(abs(s - 0.25) for s in drifting) > 0.1, drifting
    assert max(abs(s - 0.25) for s in held) < 0.025, held  # 64 tokens: within 10% of the capacity


@pytest.mark.parametrize("decision, logit", DECISIONS)
def test_every_decision_is_causal(decision, logit):
    model = tiny_model(init_std=0.3, causal_decision=decision, decision_logit=logit)
    model.calibrate(random_tokens(8, T, seed=5))
    idx = random_tokens(3, T)
    out = model(idx, routing="causal")
    changed = idx.clone()
    changed[:, 30:] = random_tokens(3, T - 30, seed=9)
    after = model(changed, routing="causal")
    torch.testing.assert_close(
        after.logits[:, :30], out.logits[:, :30], rtol=0, atol=1e-5 * float(out.logits.abs().max())
    )
    for a, b in zip(out.routing, after.routing):
        assert torch.equal(a.selected[:, :30], b.selected[:, :30])


@pytest.mark.parametrize(
    "policy", [DecodePolicy(host_decides=True, bounded_reads=True), STATIC], ids=["host", "static"]
)
@pytest.mark.parametrize("decision, logit", DECISIONS)
def test_cached_decoding_equals_the_causal_pass(decision, logit, policy):
    model = tiny_model(init_std=0.3, causal_decision=decision, decision_logit=logit)
    model.calibrate(random_tokens(8, T, seed=5))
    idx = random_tokens(3, 40)
    full = model(idx, routing="causal")
    state = model.new_state(3)
    steps = [model.prefill(idx[:, :9], state)]
    steps += [model.decode_step(idx[:, t], state, policy).unsqueeze(1) for t in range(9, 40)]
    scale = float(full.logits.abs().max())  # rounding differs between one pass and many steps, by ~1e-6 of it
    torch.testing.assert_close(torch.cat(steps, dim=1), full.logits, rtol=0, atol=1e-5 * scale)
    for info in full.routing:  # each routed block's cache holds what the pass processed
        assert torch.equal(state.caches[info.layer].length, info.selected.sum(dim=1))


def test_ragged_prompts_keep_each_rows_own_controller():
    model = tiny_model(init_std=0.3)
    model.calibrate(random_tokens(8, T, seed=5))
    prompts = [random_tokens(1, n, seed=n)[0] for n in (5, 17, 11)]
    together = model.generate(prompts, max_new_tokens=12, temperature=0)
    for prompt, out in zip(prompts, together):
        assert torch.equal(out, model.generate(prompt, max_new_tokens=12, temperature=0))


@pytest.mark.parametrize("decision, logit", DECISIONS)
def test_calibration_lives_in_the_weights_not_the_config(decision, logit):
    """A calibrated model's config is the one it had before, and a model rebuilt from that config plus the
    calibrated model's state dict decides token for token like it."""
    model = tiny_model(init_std=0.3, causal_decision=decision, decision_logit=logit)
    before = model.config.to_dict()
    model.calibrate(random_tokens(8, T, seed=5))
    assert model.config.to_dict() == before
    rebuilt = MoDTransformer(ModelConfig(**before)).eval()
    rebuilt.load_state_dict(model.state_dict())
    idx = random_tokens(3, T, seed=11)
    for a, b in zip(model(idx, routing="causal").routing, rebuilt(idx, routing="causal").routing):
        assert torch.equal(a.selected, b.selected)
    uncalibrated = tiny_model(seed=0, init_std=0.3, causal_decision=decision, decision_logit=logit)
    if decision != "plain":  # the rebuilt model decides with the thresholds, not with 0
        assert any(
            not torch.equal(a.selected, b.selected)
            for a, b in zip(model(idx, routing="causal").routing, uncalibrated(idx, routing="causal").routing)
        )


def test_calibration_travels_with_save_pretrained(tmp_path):
    model = tiny_model(init_std=0.3)
    model.calibrate(random_tokens(8, T, seed=5))
    model.save_pretrained(tmp_path)
    loaded = MoDTransformer.from_pretrained(tmp_path)
    for mine, theirs in zip(model.routers(), loaded.routers()):
        assert float(theirs.decision.threshold) == float(mine.decision.threshold) != 0.0
        assert float(theirs.decision.spread) == float(mine.decision.spread) != 1.0
