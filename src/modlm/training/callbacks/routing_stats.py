"""What the routers do, as TensorBoard scalars and histograms.

Reads each step's ``StepReport`` (``modlm.training.telemetry``: the routing of its top-k pass and,
in validation, of its causal pass) and the batch. Everything is computed (by
``modlm.analysis.metrics``) from tensors the forward pass already made, at ``every_n_steps`` (scalars)
and ``histogram_every_n_steps`` (histograms), so it costs next to nothing between those steps. Tag
names are ``modlm.training.tags``'.

Scalars per routed block ``i``:
  router/capacity_used/layer_i         fraction of tokens processed in training (top-k: k/T)
  router/capacity_used_causal/layer_i  the same under causal routing (validation)
  router/causal_acc/layer_i            causal decision vs top-k membership (also _precision, _recall:
                                       with 12.5% positives, accuracy alone flatters)
  router/overlap/layer_i               fraction of this block's picks also picked by the next routed block
  router/selected_eot/layer_i          fraction of picks that are the end-of-text token
  router/selected_first/layer_i        fraction of rows whose first position is picked
and ``router/depth_mean`` (mean number of blocks a token passes through), ``train/aux_<name>``
(each auxiliary loss, unweighted). Histograms: ``router/weight/layer_i`` (router logits),
``router/selected_pos/layer_i`` (positions picked), ``router/depth`` (blocks per token).

Scalars per mixture-of-experts MLP ``i`` (from the report's ``experts``; training routing):
  moe/load/layer_i/expert_e            share of the picks that went to real expert e
  moe/noop_fraction/layer_i            share that went to no-op experts (MLP skipped)
  moe/dropped/layer_i                  share of real-expert picks dropped over capacity
  moe/load_balance/layer_i             the load-balancing loss, unweighted (1 = balanced)
and ``train/aux_load_balance``, its mean over the MLPs.

Scalars per recursion step ``r`` of a Mixture-of-Recursions (from the report's ``recursion``):
  recursion/capacity_used/step_r         share of the sequence the step processed (top-k: its k/T)
  recursion/capacity_used_causal/step_r  the same under causal routing (validation)
  recursion/causal_acc/step_r            causal decision vs top-k, among the tokens the step chose
                                         from (also _precision, _recall; val_ ones in validation)
and ``recursion/depth_mean`` (mean recursion steps per token), ``recursion/depth_share/depth_d``
(share of tokens that took exactly d steps), ``train/aux_<name>`` (mean over the steps; token
choice's ``train/aux_recursion_balance``). Histogram: ``recursion/depth``.
"""
from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

from ...analysis.metrics import (capacity_used, decision_counts, decision_quality, depth_shares, expert_figures,
                                 quality_from_counts, recursion_decision_counts, recursion_figures, selection_figures,
                                 token_depth)
from .. import tags
from ..batch import split_batch
from ..loggers import tensorboard_writer
from ..telemetry import report_of


class RoutingStats(Callback):
    def __init__(self, every_n_steps: Optional[int] = None, histogram_every_n_steps: int = 100):
        """Scalars and histograms of what the routers did.

        Args:
            every_n_steps: Scalars every this many optimizer steps (default: the trainer's
                ``log_every_n_steps``, the only steps whose values reach the logger).
            histogram_every_n_steps: Histograms every this many optimizer steps.
        """
        self.every_n_steps = every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self._val_counts: dict = {}  # routed block -> counts; ("recursion", step) -> counts

    @staticmethod
    def _eot_id(trainer) -> Optional[int]:
        return getattr(trainer.datamodule, "eot_id", None) if trainer.datamodule is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = report_of(outputs)
        if report is None:
            return
        infos, experts = report.routing, report.experts
        step = trainer.global_step
        due = step % (self.every_n_steps or trainer.log_every_n_steps) == 0
        if experts and due:
            scalars = {}
            for figure, per_layer in expert_figures(experts).items():
                for layer, value in per_layer.items():
                    if figure == "load":
                        scalars.update({tags.moe("load", layer, e): share for e, share in enumerate(value)})
                    else:
                        scalars[tags.moe(figure, layer)] = value
            scalars[tags.train_aux("load_balance")] = torch.stack([e.load_balance for e in experts]).mean().item()
            pl_module.log_dict(scalars, on_step=True, on_epoch=False)
        if report.recursion is not None:
            self._recursion(trainer, pl_module, report.recursion, step, due)
        if not infos:
            return
        cfg = pl_module.model.config
        if due:
            input_ids = split_batch(batch)[0]
            scalars = {tags.router(figure, layer): value
                       for figure, per_layer in selection_figures(infos, input_ids, self._eot_id(trainer)).items()
                       for layer, value in per_layer.items()}
            if not cfg.random_routing:
                for info in infos:
                    for name, value in decision_quality(info).items():
                        scalars[tags.router(name, info.layer)] = value
            scalars[tags.DEPTH_MEAN] = token_depth(infos, cfg.n_layers).float().mean().item()
            for name in infos[0].aux_losses:
                scalars[tags.train_aux(name)] = torch.stack([i.aux_losses[name] for i in infos]).mean().item()
            pl_module.log_dict(scalars, on_step=True, on_epoch=False)
        if step % self.histogram_every_n_steps == 0:
            self._histograms(trainer, infos, cfg.n_layers, step)

    def _recursion(self, trainer, pl_module, info, step: int, due: bool) -> None:
        if due:
            decisions = not pl_module.model.config.random_routing
            scalars = {tags.recursion(figure, r): value for figure, per_step in recursion_figures(info, decisions).items()
                       for r, value in per_step.items()}
            scalars[tags.RECURSION_DEPTH_MEAN] = info.depth.float().mean().item()
            scalars.update({tags.recursion_depth_share(d): share for d, share in enumerate(depth_shares(info))})
            for name in info.steps[0].aux_losses:
                scalars[tags.train_aux(name)] = torch.stack([s.aux_losses[name] for s in info.steps]).mean().item()
            for name, value in (info.aux_losses or {}).items():  # token choice's balance
                scalars[tags.train_aux(name)] = value.item()
            pl_module.log_dict(scalars, on_step=True, on_epoch=False)
        if step % self.histogram_every_n_steps == 0:
            writer = tensorboard_writer(trainer)
            if writer is not None:
                writer.add_histogram(tags.RECURSION_DEPTH_HISTOGRAM, info.depth.flatten().cpu(), step)

    def _histograms(self, trainer, infos, n_layers: int, step: int) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for info in infos:
            writer.add_histogram(tags.router("weight", info.layer), info.router_logits.float().cpu(), step)
            positions = info.selected.nonzero()[:, 1]
            if positions.numel():
                writer.add_histogram(tags.router("selected_pos", info.layer), positions.cpu(), step)
        writer.add_histogram(tags.DEPTH_HISTOGRAM, token_depth(infos, n_layers).flatten().cpu(), step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_counts = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Causal-mode capacity (epoch mean) and decision counts, summed until the epoch ends."""
        report = report_of(outputs)
        if report is not None and report.causal_recursion is not None and not trainer.sanity_checking:
            self._causal_recursion(pl_module, report.causal_recursion)
        infos = report.causal_routing if report is not None else None
        if not infos or trainer.sanity_checking:
            return
        pl_module.log_dict({tags.router("capacity_used_causal", info.layer): capacity_used(info)
                            for info in infos}, on_step=False, on_epoch=True, sync_dist=True)
        if not pl_module.model.config.random_routing:
            for info in infos:
                self._val_counts[info.layer] = self._val_counts.get(info.layer, 0) + decision_counts(info)

    def _causal_recursion(self, pl_module, info) -> None:
        pl_module.log_dict({tags.recursion("capacity_used_causal", step.layer): capacity_used(step) for step in info.steps},
                           on_step=False, on_epoch=True, sync_dist=True)
        if not pl_module.model.config.random_routing:
            for layer, counts in recursion_decision_counts(info).items():
                key = ("recursion", layer)
                self._val_counts[key] = self._val_counts.get(key, 0) + counts

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Accuracy, precision and recall over every validation token of every rank (ratios of
        summed counts, as ``eval.py`` computes them, not means of per-batch ratios)."""
        if trainer.sanity_checking:
            return
        scalars = {}
        for layer, counts in self._val_counts.items():
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            for name, value in quality_from_counts(counts).items():
                if isinstance(layer, tuple):  # a recursion step's
                    scalars[tags.recursion(f"val_{name}", layer[1])] = value
                else:
                    scalars[tags.router(f"val_{name}", layer)] = value
        if scalars:
            pl_module.log_dict(scalars, on_step=False, on_epoch=True)
