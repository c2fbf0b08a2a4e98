"""A real tiny training run writes every routing and FLOPs tag with the right values."""

from __future__ import annotations

import pytest

from modlm import ModelConfig
from modlm.flops import flops_ratio_vs_dense, training_flops
from tests.helpers import TINY_DATA, fit_events, logged, tiny_args, tiny_preset_config

STEPS = 6


@pytest.fixture(scope="module")
def events(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("telemetry")
    return fit_events(
        root,
        tiny_args(
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
            "--flops.peak_flops",
            "1e11",
        ),
    )


@pytest.mark.slow
def test_every_tag_is_written(events):
    tags = events.Tags()
    expected_scalars = {
        "train/loss",
        "train/aux_loss",
        "train/aux_predictor_bce",
        "val/loss",
        "val/ppl",
        "val/loss_causal",
        "router/capacity_used/layer_1",
        "router/val_capacity_used/layer_1",
        "router/causal_acc/layer_1",
        "router/val_causal_acc/layer_1",
        "router/val_causal_precision/layer_1",
        "router/val_causal_recall/layer_1",
        "router/causal_precision/layer_1",
        "router/causal_recall/layer_1",
        "router/selected_first/layer_1",
        "router/selected_eot/layer_1",
        "router/depth_mean",
        "flops/step",
        "flops/total",
        "flops/ratio_vs_dense",
        "flops/mfu",
        "flops/measured_per_batch",
        "flops/analytic_per_batch",
    }
    assert expected_scalars <= set(tags["scalars"]), expected_scalars - set(tags["scalars"])
    assert {"router/weight/layer_1", "router/selected_pos/layer_1", "router/depth"} <= set(tags["histograms"])
    assert "router/heatmap" in tags["images"]
    assert any(tag.endswith("items_per_sec") for tag in tags["scalars"])  # Lightning's ThroughputMonitor


@pytest.mark.slow
def test_values_follow_the_method(events):
    cfg = tiny_preset_config()
    seq, batch = TINY_DATA["seq_len"], TINY_DATA["batch_size"]
    k_over_t = cfg.topk_tokens(seq) / seq
    assert all(v == k_over_t for v in logged(events, "router/capacity_used/layer_1"))
    assert all(v == 1 + k_over_t for v in logged(events, "router/depth_mean"))  # one dense block + routed share
    assert all(0 <= v <= 1 for v in logged(events, "router/causal_acc/layer_1"))
    assert all(0 <= v <= 1 for v in logged(events, "router/val_capacity_used/layer_1"))
    assert len(logged(events, "router/val_causal_acc/layer_1")) == STEPS // 3  # once per validation run
    assert all(0 <= v <= 1 for v in logged(events, "router/val_causal_acc/layer_1"))
    per_step = batch * training_flops(cfg, seq)
    assert logged(events, "flops/step") == [pytest.approx(per_step)] * STEPS
    assert logged(events, "flops/total")[-1] == pytest.approx(STEPS * per_step)
    assert logged(events, "flops/ratio_vs_dense")[0] == pytest.approx(flops_ratio_vs_dense(cfg, seq))
    measured, analytic = logged(events, "flops/measured_per_batch"), logged(events, "flops/analytic_per_batch")
    assert analytic == [pytest.approx(per_step)] and abs(analytic[0] / measured[0] - 1) < 0.02
    assert len(events.Histograms("router/selected_pos/layer_1")) == STEPS // 2
    assert events.Images("router/heatmap")[0].width > 100


def written_layout(acc) -> dict[str, dict[str, list[str]]]:
    """The Custom Scalars layout in the run's events: category -> chart title -> tag patterns."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


@pytest.mark.slow
def test_dashboard_groups_only_tags_the_run_logs(events):
    import re

    layout = written_layout(events)
    assert list(layout) == ["1 loss", "2 routing", "3 compute"]
    logged = set(events.Tags()["scalars"])
    patterns = [p for charts in layout.values() for tags in charts.values() for p in tags]
    for pattern in patterns:
        assert [t for t in logged if re.fullmatch(pattern.strip("^$"), t)], f"{pattern} matches no logged tag"
    # every routed block's capacity on one chart, top-k and causal
    (capacity,) = [tags for title, tags in layout["2 routing"].items() if title.startswith("capacity used")]
    assert capacity == ["^router/capacity_used/layer_1$", "^router/val_capacity_used/layer_1$"]
    assert ["^train/loss$", "^val/loss$", "^val/loss_causal$"] in layout["1 loss"].values()
    assert ["^flops/mfu$"] in layout["3 compute"].values()  # --flops.peak_flops was given


@pytest.mark.slow
def test_no_constant_cards(events):
    assert not {"epoch", "hp_metric"} & set(events.Tags()["scalars"])


def test_dense_layout_has_no_routing_charts():
    from modlm.training.callbacks.dashboard import layout

    dense = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, route_every=0)
    groups = layout(dense, mfu_tags=[])
    assert list(groups) == ["1 loss", "3 compute"]
    assert all(
        not t.startswith("router/") and t != "val/loss_causal"
        for charts in groups.values()
        for _, tags in charts
        for t in tags
    )
    routed = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, route_every=2, capacity=0.25)
    (capacity,) = [
        tags for title, tags in layout(routed, [])["2 routing"] if "capacity used" in title and "(target 0.25)" in title
    ]
    assert capacity == [
        "router/capacity_used/layer_1",
        "router/capacity_used/layer_3",
        "router/val_capacity_used/layer_1",
        "router/val_capacity_used/layer_3",
    ]
