"""The MoD dashboard: TensorBoard's Custom Scalars page, laid out once per run.

TensorBoard's Time Series page shows one small card per tag in alphabetical order, so comparing
the routed blocks of a run means scrolling between cards. The Custom Scalars page draws several
tags on one chart; this callback writes its layout (once, at the start of a fit) with what a
Mixture-of-Depths user compares side by side:

  loss      train loss with validation loss under top-k and under causal routing; the auxiliary losses
  routing   capacity used by every routed block (top-k in training, causal in validation; the
            target capacity in the title); the causal decision's accuracy, precision and recall
            against top-k membership, all blocks on each chart; overlap between consecutive routed
            blocks and the mean depth a token passes through
  compute   FLOPs per optimizer step and the MoD/dense FLOPs ratio; tokens per second; MFU where a
            peak FLOP/s is known
  recursion (Mixture-of-Recursions) the share of the sequence each recursion step processes (top-k
            and causal), its causal decision's accuracy among the tokens it chose from, the mean
            recursion depth and the share of tokens at each depth
  moe       (models with experts) per mixture-of-experts MLP, the share of picks each expert gets;
            the no-op share (integrated MoDE), the picks dropped over capacity and the
            load-balancing loss, every MLP on each chart

The layout names only tags the run logs: routing charts are left out of dense runs, MFU where no
peak is known. Open it with ``tensorboard --logdir runs`` and the "Custom Scalars" tab.

The HParams tab gets the run's hyperparameters (``model/...``, ``data/...``, the trainer's
``max_steps`` and precision) with the validation losses and perplexities as its metrics (their
latest values), so runs of one ``--logdir`` compare in one table.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

from ...model.config import ModelConfig
from .. import tags
from ..loggers import tensorboard_writer

Chart = tuple[str, list[str]]  # title, tags drawn on it


def loss_charts(cfg: ModelConfig) -> list[Chart]:
    val = [tags.eval_loss("val"), tags.eval_loss("val", causal=True)] if cfg.routes_tokens else [tags.eval_loss("val")]
    charts = [
        (
            "loss: train, validation (top-k), validation (causal)" if cfg.routes_tokens else "loss: train, validation",
            [tags.TRAIN_LOSS, *val],
        )
    ]
    if cfg.routes_tokens:
        aux = []
        if cfg.n_deciders:
            aux.append(tags.train_aux("predictor_bce" if cfg.causal_method == "predictor" else "router_bce"))
        if cfg.expert_layers:
            aux.append(tags.train_aux("load_balance"))
        charts.append(
            ("auxiliary loss (weighted total; unweighted routing BCE, load balance)", [tags.TRAIN_AUX_LOSS, *aux])
        )
    return charts


def routing_charts(cfg: ModelConfig) -> list[Chart]:
    layers = cfg.routed_layers
    if not layers:
        return []
    per = lambda name, ls=layers: [tags.router(name, i) for i in ls]  # noqa: E731
    target = " / ".join(f"{c:g}" for c in dict.fromkeys(cfg.layer_capacities))  # per block when they differ
    charts = [
        (
            f"capacity used per routed block (target {target}): top-k in training, causal in validation",
            per("capacity_used") + per("val_capacity_used"),
        )
    ]
    if not cfg.random_routing:  # random picks have no causal decision to grade
        charts += [
            (f"causal decision vs top-k: {what}, per routed block", per(f"causal_{name}"))
            for name, what in (("acc", "accuracy"), ("precision", "precision"), ("recall", "recall"))
        ]
    if len(layers) > 1:
        charts.append(
            ("overlap: share of a block's picks the next routed block picks too", per("overlap", layers[:-1]))
        )
    charts.append(("mean number of blocks a token passes through", [tags.DEPTH_MEAN]))
    return charts


def recursion_charts(cfg: ModelConfig) -> list[Chart]:
    if not cfg.routes_recursion:
        return []
    per = lambda name: [tags.recursion(name, r) for r in range(cfg.recursions)]  # noqa: E731
    target = " / ".join(f"{c:.3g}" for c in cfg.step_capacities)
    if not cfg.routed_steps:  # token choice: the router's shares (within each step's slots in training)
        charts = [
            (
                f"share of the sequence each recursion step processes (balanced: {target}): training (within its "
                "slots), causal in validation",
                per("capacity_used") + per("val_capacity_used"),
            ),
            ("depth load-balancing loss, unweighted (1 = balanced)", [tags.train_aux("recursion_balance")]),
        ]
    else:
        charts = [
            (
                f"share of the sequence each recursion step processes (target {target}): top-k in training, causal "
                "in validation",
                per("capacity_used") + per("val_capacity_used"),
            )
        ]
    if cfg.routed_steps and not cfg.random_routing:
        charts.append(
            (
                "causal decision vs top-k per recursion step, among the tokens it chose from: accuracy",
                per("causal_acc") + per("val_causal_acc"),
            )
        )
    charts += [
        ("mean recursion steps a token takes", [tags.RECURSION_DEPTH_MEAN]),
        (
            "share of tokens taking exactly d recursion steps",
            [tags.recursion_depth_share(d) for d in range(cfg.recursions + 1)],
        ),
    ]
    return charts


def compute_charts(mfu_tags: list[str]) -> list[Chart]:
    charts = [
        ("training FLOPs per optimizer step (all ranks)", [tags.FLOPS_STEP]),
        ("forward FLOPs / dense twin's", [tags.FLOPS_RATIO]),
        ("tokens per second (this device)", [tags.TOKENS_PER_SEC]),
    ]
    if mfu_tags:
        charts.append(("model FLOPs utilisation", mfu_tags))
    return charts


def expert_charts(cfg: ModelConfig) -> list[Chart]:
    layers = cfg.expert_layers
    if not layers:
        return []
    n_choices = cfg.n_experts + cfg.noop_experts
    charts = [
        (
            f"expert load, block {i}: share of picks (balanced: {1 / n_choices:.3g} each)",
            [tags.moe("load", i, e) for e in range(cfg.n_experts)],
        )
        for i in layers
    ]
    per = lambda name: [tags.moe(name, i) for i in layers]  # noqa: E731
    if cfg.noop_experts:
        charts.append(
            (f"no-op share of picks: MLP skipped (balanced: {cfg.noop_experts / n_choices:.3g})", per("noop_fraction"))
        )
    charts += [
        (f"picks dropped over capacity (capacity factor {cfg.capacity_factor:g})", per("dropped")),
        ("load-balancing loss, unweighted (1 = balanced)", per("load_balance")),
    ]
    return charts


def layout(cfg: ModelConfig, mfu_tags: list[str]) -> dict[str, list[Chart]]:
    """Category -> charts, in the order the page shows them (empty categories dropped)."""
    groups = {
        "1 loss": loss_charts(cfg),
        "2 routing": routing_charts(cfg),
        "2 recursion": recursion_charts(cfg),
        "3 compute": compute_charts(mfu_tags),
        "4 moe": expert_charts(cfg),
    }
    return {name: charts for name, charts in groups.items() if charts}


def hparams_metrics(cfg: ModelConfig, validate_causal: bool = True) -> list[str]:
    """The HParams tab's metrics: validation loss and perplexity (also under causal routing for a
    routed model that validates with it), then the training loss."""
    tags_ = [tags.eval_loss("val"), tags.eval_ppl("val")]
    if cfg.routes_tokens and validate_causal:
        tags_ += [tags.eval_loss("val", causal=True), tags.eval_ppl("val", causal=True)]
    return tags_ + [tags.TRAIN_LOSS]


def as_tensorboard_layout(groups: dict[str, list[Chart]]) -> dict:
    """The dict ``SummaryWriter.add_custom_scalars`` takes. Its tags are regular expressions, so
    each exact tag is anchored and escaped."""
    import re

    return {
        name: {title: ["Multiline", [f"^{re.escape(tag)}$" for tag in names]] for title, names in charts}
        for name, charts in groups.items()
    }


class Dashboard(Callback):
    def __init__(self, enabled: bool = True):
        """TensorBoard's Custom Scalars page laid out for a MoD run, and its HParams tab filled.

        Args:
            enabled: Write the layout and the HParams summary at the start of each fit (false: leave
                both pages empty).
        """
        self.enabled = enabled
        self.groups: Optional[dict[str, list[Chart]]] = None

    def mfu_tags(self, trainer, pl_module) -> list[str]:
        from lightning.pytorch.callbacks import ThroughputMonitor

        from .flops_meter import FlopsMeter

        found = []
        if any(isinstance(cb, FlopsMeter) and cb.peak_flops for cb in trainer.callbacks):
            found.append(tags.FLOPS_MFU)
        monitor = any(isinstance(cb, ThroughputMonitor) for cb in trainer.callbacks)
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        if monitor and get_available_flops(pl_module.device, dtype) is not None:
            found.append(tags.DEVICE_MFU)
        return found

    def on_fit_start(self, trainer, pl_module) -> None:
        writer = tensorboard_writer(trainer) if self.enabled else None
        if writer is None:
            return
        cfg = pl_module.model.config
        self.groups = layout(cfg, self.mfu_tags(trainer, pl_module))
        writer.add_custom_scalars(as_tensorboard_layout(self.groups))
        logger = next((lg for lg in trainer.loggers if hasattr(lg, "log_hparams_summary")), None)
        if logger is not None:
            metrics = hparams_metrics(cfg, pl_module.hparams.get("validate_causal", True))
            params = {
                **dict(logger.hparams),
                "trainer/max_steps": trainer.max_steps,
                "trainer/precision": str(trainer.precision),
            }
            logger.log_hparams_summary(params, metrics)
