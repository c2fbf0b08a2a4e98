"""What the mixtures do, as TensorBoard scalars and histograms.

Reads each step's ``StepReport`` (``modlm.training.telemetry``: what every mixture did in its top-k pass
and, in validation, in its causal pass) and the batch. The figures are the mixtures' kinds' own
(``modlm.analysis.metrics``: a file per kind lists them), computed from tensors the forward pass already
made, at ``every_n_steps`` (scalars) and ``histogram_every_n_steps`` (histograms), so it costs next to
nothing between those steps. No kind is named here. Tag names are ``modlm.training.tags``':

  <kind>/<figure>/<where>        a figure of the training step's top-k pass: router/capacity_used/layer_3,
                                 router/causal_acc/layer_3, moe/load/layer_1/expert_0,
                                 recursion/capacity_used/step_1, recursion/depth_mean, ...
  <kind>/val_<figure>/<where>    the same over a validation run's causal-routing pass, every batch of every
                                 rank (router/val_capacity_used/layer_3, router/val_causal_acc/layer_3)
  router/depth_mean              mean number of blocks a token passes through (every kind's spans)
  train/aux_<name>               each auxiliary loss, unweighted, averaged over the mixtures reporting it

Histograms: each kind's (``router/weight/layer_i``: router logits; ``router/selected_pos/layer_i``:
positions picked; ``recursion/depth``: recursion steps per token) and ``router/depth`` (blocks per token).
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.callbacks import Callback

from ...analysis.metrics import add_tallies, aux_losses, figures, histograms, tally, token_depth
from .. import tags
from ..batch import split_batch
from ..loggers import tensorboard_writer
from ..telemetry import report_of


class RoutingStats(Callback):
    def __init__(self, every_n_steps: Optional[int] = None, histogram_every_n_steps: int = 100):
        """Scalars and histograms of what the mixtures did.

        Args:
            every_n_steps: Scalars every this many optimizer steps (default: the trainer's
                ``log_every_n_steps``, the only steps whose values reach the logger).
            histogram_every_n_steps: Histograms every this many optimizer steps.
        """
        self.every_n_steps = every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self._val_tallies: dict = {}  # summed over a validation run's batches

    @staticmethod
    def _eot_id(trainer) -> Optional[int]:
        return getattr(trainer.datamodule, "eot_id", None) if trainer.datamodule is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = report_of(outputs)
        if report is None or not report.mixtures:
            return
        mixtures, cfg = report.mixtures, pl_module.model.config
        step = trainer.global_step
        if step % (self.every_n_steps or trainer.log_every_n_steps) == 0:
            found = figures(tally(mixtures, cfg, split_batch(batch)[0], self._eot_id(trainer)))
            scalars = {
                tags.mixture(prefix, key): value for prefix, values in found.items() for key, value in values.items()
            }
            depth = token_depth(mixtures, cfg)
            if not isinstance(depth, int):  # some mixture decides how many blocks a token passes
                scalars[tags.DEPTH_MEAN] = depth.float().mean().item()
            scalars.update({tags.train_aux(name): value.item() for name, value in aux_losses(mixtures).items()})
            pl_module.log_dict(scalars, on_step=True, on_epoch=False)
        if step % self.histogram_every_n_steps == 0:
            writer = tensorboard_writer(trainer)
            if writer is None:
                return
            for prefix, values in histograms(mixtures).items():
                for key, value in values.items():
                    writer.add_histogram(tags.mixture(prefix, key), value.float().cpu(), step)
            depth = token_depth(mixtures, cfg)
            if not isinstance(depth, int):
                writer.add_histogram(tags.DEPTH_HISTOGRAM, depth.flatten().cpu(), step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_tallies = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """The causal pass's tallies, summed until the epoch ends."""
        report = report_of(outputs)
        if report is None or not report.causal_mixtures or trainer.sanity_checking:
            return
        add_tallies(
            self._val_tallies,
            tally(report.causal_mixtures, pl_module.model.config, split_batch(batch)[0], self._eot_id(trainer)),
        )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Every figure over every validation token of every rank (ratios of summed tallies, as ``eval.py``
        computes them, not means of per-batch ratios)."""
        if trainer.sanity_checking or not self._val_tallies:
            return
        summed = {
            prefix: {key: trainer.strategy.reduce(value, reduce_op="sum") for key, value in found.items()}
            for prefix, found in self._val_tallies.items()
        }
        scalars = {
            tags.mixture(prefix, key, validation=True): value
            for prefix, values in figures(summed).items()
            for key, value in values.items()
        }
        pl_module.log_dict(scalars, on_step=False, on_epoch=True)
