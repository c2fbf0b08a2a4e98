"""The MoDE presets train from the command line, log the expert tags the dashboard draws, and
evaluate with eval.py (tiny shapes: the presets' routing fields on top of the tiny run)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from modlm import ModelConfig
from modlm.cli.eval import main as eval_main
from modlm.cli.train import main as train_main
from modlm.flops import forward_flops
from tests.helpers import REPO, TINY_DATA, tiny_args

pytestmark = pytest.mark.slow  # training runs of every expert preset and their evaluation

PRESETS = ["moe", "mode_staged", "mode_integrated"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """Each preset under the tiny run's shape: 4 steps, validation at 2 and 4."""
    root = tmp_path_factory.mktemp("mode_runs")
    out = {}
    for name in PRESETS:
        args = [
            "fit",
            "--config",
            str(REPO / "configs" / f"{name}.yaml"),
            *tiny_args(
                root / name,
                tiny_tokenizer,
                "--trainer.max_steps",
                "4",
                "--trainer.val_check_interval",
                "2",
                "--routing_stats.every_n_steps",
                "1",
            ),
        ]
        assert train_main(args) == 0
        (log_dir,) = list((root / name).glob("lightning_logs/version_*"))
        acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        ckpt = root / name / "checkpoints" / "last.ckpt"
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
        out[name] = (acc, ckpt, ModelConfig.from_hparams(hparams))
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_expert_tags_are_logged_and_drawn(runs, name):
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc, _, cfg = runs[name]
    assert cfg.n_experts == 4 and cfg.expert_layers == [0, 1]
    logged = set(acc.Tags()["scalars"])
    for layer in cfg.expert_layers:
        loads = [acc.Scalars(f"moe/load/layer_{layer}/expert_{e}") for e in range(4)]
        noop = [e.value for e in acc.Scalars(f"moe/noop_fraction/layer_{layer}")] if cfg.noop_experts else [0.0] * 4
        for step in range(4):  # the shares of real and no-op experts add up to every pick
            assert sum(series[step].value for series in loads) + noop[step] == pytest.approx(1.0, abs=1e-6)
        assert all(0 <= e.value <= 1 for e in acc.Scalars(f"moe/dropped/layer_{layer}"))
        assert len(acc.Scalars(f"moe/load_balance/layer_{layer}")) == 4
    assert ("moe/noop_fraction/layer_0" in logged) == (name == "mode_integrated")
    assert ("router/capacity_used/layer_1" in logged) == (name == "mode_staged")
    assert {"train/aux_load_balance", "val/loss_causal"} <= logged
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    groups = {c.title: [tag for chart in c.chart for tag in chart.multiline.tag] for c in layout.category}
    assert "4 moe" in groups and ("2 routing" in groups) == (name == "mode_staged")
    drawn = [p for title, tags in groups.items() if title != "3 compute" for p in tags]  # (compute: 4 steps are
    for pattern in drawn:  # too few for the throughput window)
        assert [t for t in logged if re.fullmatch(pattern.strip("^$"), t)], f"{pattern} matches no logged tag"


@pytest.mark.parametrize("name", PRESETS)
def test_eval_reports_expert_figures_and_the_flops_they_cost(runs, name, tmp_path):
    _, ckpt, cfg = runs[name]
    out = tmp_path / "result.json"
    flags = ["--quiet", "--data.max_batches", "2", "--decode_tokens", "8", "--prompt_tokens", "8"]
    assert eval_main([str(ckpt), "--json", str(out), *flags]) == 0
    result = json.loads(out.read_text())
    for key in (
        "topk.loss",
        "causal.loss",
        "causal.expert_slots.layer_0",
        "causal.dropped.layer_0",
        "flops_per_token",
        "decode_tokens_per_s",
    ):
        assert math.isfinite(result[key]), key
    assert result["causal.dropped.layer_0"] == 0  # inference keeps every pick
    assert ("causal.noop_fraction.layer_0" in result) == (name == "mode_integrated")
    used = [result[f"causal.capacity_used.layer_{i}"] for i in cfg.routed_layers] or None
    slots = [result[f"causal.expert_slots.layer_{i}"] for i in cfg.expert_layers]
    seq = TINY_DATA["seq_len"]
    expected = (
        forward_flops(
            cfg,
            seq,
            tokens_per_routed_block=None if used is None else [u * seq for u in used],
            passes_per_expert_layer=slots,
        )
        / seq
    )
    assert result["flops_per_token"] == pytest.approx(expected)
    if name != "mode_staged":  # every token reaches the MLP: each makes one pick (no-op ones not computed)
        assert result["causal.expert_slots.layer_0"] == pytest.approx(
            seq * (1 - result.get("causal.noop_fraction.layer_0", 0))
        )
