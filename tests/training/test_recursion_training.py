"""A Mixture-of-Recursions preset trains through the command line and writes its recursion tags
with the values the method fixes: each step's top-k share, the depth distribution it implies, the
exact FLOPs; and a run resumed from its checkpoint logs the losses of the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import yaml

from modlm import ModelConfig
from modlm.cli.eval import main as eval_main
from modlm.cli.train import main as train_main
from modlm.flops import forward_flops, training_flops
from tests.helpers import REPO, TINY_DATA, assert_same_losses_after_resume, fit_events, logged, scalars, tiny_args

pytestmark = pytest.mark.slow  # training runs of every recursion preset, a resume, and their evaluation

STEPS = 6
MOR = ("--config", str(REPO / "configs" / "mor.yaml"))


def mor_args(root, data, *extra, preset=None):
    """tiny.yaml, then mor.yaml (and a preset stacked on it), then the run's own settings."""
    args = tiny_args(root, data, *extra)
    at = args.index("--trainer.default_root_dir")
    stacked = ["--config", str(REPO / "configs" / preset)] if preset else []
    return args[:at] + list(MOR) + stacked + args[at:]


@pytest.fixture(scope="module")
def events(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("mor")
    return fit_events(
        root,
        mor_args(
            root,
            tiny_tokenizer,
            "--trainer.max_steps",
            str(STEPS),
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--routing_stats.every_n_steps",
            "1",
            "--routing_stats.histogram_every_n_steps",
            "2",
        ),
    )


def evaluated(root) -> dict:
    """``eval.py`` on a run's last checkpoint (a short decode test): its JSON."""
    out = root / "eval.json"
    flags = ["--json", str(out), "--quiet", "--decode_tokens", "4", "--prompt_tokens", "4"]
    assert eval_main([str(root / "checkpoints" / "last.ckpt"), *flags]) == 0
    return json.loads(out.read_text())


def test_recursion_tags_follow_the_schedule(events):
    seq = TINY_DATA["seq_len"]
    cfg = ModelConfig(
        vocab_size=TINY_DATA["vocab_size"],
        d_model=32,
        n_layers=8,
        n_heads=2,
        max_seq_len=seq,
        route_every=0,
        recursions=3,
    )
    k = [cfg.topk_tokens(seq, c) for c in cfg.step_capacities]
    assert k == [32, 21, 10]
    for step in range(3):
        assert logged(events, f"recursion/capacity_used/step_{step}") == [k[step] / seq] * STEPS
        assert len(logged(events, f"recursion/val_capacity_used/step_{step}")) == STEPS // 3
        assert all(0 <= v <= 1 for v in logged(events, f"recursion/val_causal_acc/step_{step}"))
        assert all(0 <= v <= 1 for v in logged(events, f"recursion/causal_acc/step_{step}"))
    assert logged(events, "recursion/depth_mean") == [pytest.approx(sum(k) / seq)] * STEPS
    # hierarchical filtering: k_r tokens took at least r + 1 steps, so exactly k_r - k_{r+1} took r + 1
    shares = [logged(events, f"recursion/depth_share/depth_{d}") for d in range(4)]
    assert shares == [[pytest.approx(s)] * STEPS for s in (0, (32 - 21) / seq, (21 - 10) / seq, 10 / seq)]
    assert all(v > 0 for v in logged(events, "train/aux_predictor_bce"))
    assert len(events.Histograms("recursion/depth")) == STEPS // 2
    assert events.Images("router/heatmap")[0].width > 100
    per_step = TINY_DATA["batch_size"] * training_flops(cfg, seq)
    assert logged(events, "flops/step") == [pytest.approx(per_step)] * STEPS
    # the first step's cross-check counts a meta-device model's FLOPs with torch: equal
    assert logged(events, "flops/analytic_per_batch") == logged(events, "flops/measured_per_batch") == [per_step]


def test_dashboard_draws_a_recursion_group(events):
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    groups = {c.title: [tag for chart in c.chart for tag in chart.multiline.tag] for c in layout.category}
    assert "2 routing" not in groups
    drawn = {tag.strip("^$").replace("\\", "") for tag in groups["2 recursion"]}
    written = set(events.Tags()["scalars"])
    assert drawn <= written, drawn - written
    assert "recursion/depth_share/depth_3" in drawn and "recursion/val_capacity_used/step_2" in drawn


def test_a_resumed_recursive_run_logs_the_losses_of_the_uninterrupted_one(tmp_path, tiny_tokenizer):
    n, cut = 6, 3
    common = (
        "--trainer.max_steps",
        str(n),
        "--checkpoint.every_n_train_steps",
        str(cut),
        "--trainer.val_check_interval",
        str(n),
        "--model.lr_decay_steps",
        str(n),
    )  # one LR plan for the cut run too
    assert train_main(["fit", *mor_args(tmp_path / "full", tiny_tokenizer, *common)]) == 0
    assert (
        train_main(["fit", *mor_args(tmp_path / "cut", tiny_tokenizer, *common, "--trainer.max_steps", str(cut))]) == 0
    )
    assert train_main(["fit", *mor_args(tmp_path / "cut", tiny_tokenizer, *common, "--ckpt_path", "last")]) == 0
    want = scalars(tmp_path / "full" / "lightning_logs" / "version_0")
    got = scalars(tmp_path / "cut" / "lightning_logs" / "version_0")  # a resumed run goes on in its own folder
    assert_same_losses_after_resume(want, got, cut, n)


def test_token_choice_trains_with_its_balance_and_the_router_s_shares_and_evaluates(tmp_path, tiny_tokenizer):
    """Its steps train in static slots: the shares are what the router picked within them (hierarchical,
    the first step every token), the meta-device FLOPs cross-check runs and agrees, validation runs the
    causal computation too, and eval.py reports it (a step with no top-k has no decision figures)."""
    args = [
        "fit",
        *mor_args(
            tmp_path,
            tiny_tokenizer,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            preset="mor_token_choice.yaml",
        ),
    ]
    assert train_main(args) == 0
    got = scalars(tmp_path / "lightning_logs" / "version_0")
    assert all(0 < v <= 3 for v in got["train/aux_recursion_balance"].values())  # N_r at most
    shares = [list(got[f"recursion/capacity_used/step_{r}"].values()) for r in range(3)]
    assert shares[0] == [1.0, 1.0] and all(a >= b for a, b in zip(shares[1], shares[2]))
    assert got["flops/measured_per_batch"][0] == got["flops/analytic_per_batch"][0]
    assert "val/loss" in got and "val/loss_causal" in got
    ev = evaluated(tmp_path)
    assert ev["causal.capacity_used.step_0"] == 1.0 and sum(
        ev[f"causal.depth_share.depth_{d}"] for d in range(4)
    ) == pytest.approx(1.0)
    assert not any(key.startswith("causal.causal_acc.step_") for key in ev)


@pytest.mark.parametrize("preset, kv_share", [(None, "between"), ("mor_dense.yaml", None), ("mor_shared_kv.yaml", 0.5)])
def test_every_recursion_preset_trains_and_evaluates_from_the_command_line(tmp_path, tiny_tokenizer, preset, kv_share):
    """Each preset stacked on mor.yaml trains, its FLOPs telemetry compares it with the plain model of
    its depth (every block its own weights, keys and values), and eval reports its recursion figures:
    each step's share of the validation tokens (top-k: exactly the schedule's k), the depths they
    imply, and the KV cache held while sampling against the plain model's (shared keys and values cache
    the unique blocks and the first step's stack only, 4 of 8 blocks; the dense recursion routes
    nothing and has no sampling figures). Token choice has its own test."""
    args = [
        "fit",
        *mor_args(
            tmp_path, tiny_tokenizer, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", preset=preset
        ),
    ]
    assert train_main(args) == 0
    got = scalars(tmp_path / "lightning_logs" / "version_0")
    ev = evaluated(tmp_path)
    seq = TINY_DATA["seq_len"]
    shape = dict(vocab_size=TINY_DATA["vocab_size"], d_model=32, n_layers=8, n_heads=2, max_seq_len=seq, route_every=0)
    fields = yaml.safe_load((REPO / "configs" / preset).read_text())["model"] if preset else {}
    recursive = ModelConfig(**shape, recursions=3, **fields)
    assert got["flops/step"][0] == TINY_DATA["batch_size"] * training_flops(recursive, seq)
    want = forward_flops(recursive, seq) / forward_flops(ModelConfig(**shape), seq)
    assert list(got["flops/ratio_vs_dense"].values()) == [pytest.approx(want)]
    assert ev["flops_per_token_topk"] == forward_flops(recursive, seq) / seq
    if recursive.recursion_routing == "dense":  # no routers: one computation, every token every step
        assert "causal.depth_share.depth_3" not in ev and ev["topk.loss"] == ev["causal.loss"]
    else:
        k = [recursive.topk_tokens(seq, c) for c in recursive.step_capacities]
        assert [ev[f"topk.capacity_used.step_{r}"] for r in range(3)] == [n / seq for n in k]
        assert [ev[f"topk.depth_share.depth_{d}"] for d in range(4)] == pytest.approx(
            [0.0, (k[0] - k[1]) / seq, (k[1] - k[2]) / seq, k[2] / seq]
        )
        causal = [ev[f"causal.depth_share.depth_{d}"] for d in range(4)]
        assert causal[0] == 0.0 and sum(causal) == pytest.approx(1.0)  # every token takes the first step
        assert ev["causal.capacity_used.step_0"] == ev["generate.capacity_used.step_0"] == 1.0
    if kv_share == "between":  # recursion-wise caches hold each step's own tokens
        assert 0.5 < ev["generate.kv_cache_share"] < 1.0
    elif kv_share is not None:
        assert ev["generate.kv_cache_share"] == kv_share
