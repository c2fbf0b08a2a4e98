"""What each optimizer step costs in FLOPs, and what MoD saves, as TensorBoard scalars.

  flops/step            training FLOPs of the optimizer step: every micro-batch of the gradient
                        accumulation, on every rank; analytic (``modlm.analysis.flops``, each step's
                        ``StepReport.flops``), with the k tokens each routed block processes in top-k
                        at that step (a capacity schedule changes them)
  flops/total           cumulative, restored on resume
  flops/ratio_vs_dense  forward FLOPs of the model at the step's k / those of its dense twin
  flops/mfu             model FLOP/s over ``peak_flops``, the mean over the steps since the last
                        logged one (only when ``peak_flops`` is given; use it
                        where Lightning's device table has no entry, e.g. CPUs, "NVIDIA H200",
                        and ThroughputMonitor's own MFU is therefore missing)

They are logged on the steps that log (``log_every_n_steps``) and cost no host synchronisation in
between. At the first step the analytic count of a batch is cross-checked against Lightning's
``measure_flops`` on a meta-device copy of the model at that step's capacities
(``flops/measured_per_batch`` beside ``flops/analytic_per_batch``), with a warning when they differ
by more than 2%.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ...analysis.flops import flops_ratio_vs_dense, training_flops
from ...model.config import ModelConfig
from ...model.transformer import MoDTransformer
from .. import tags
from ..batch import split_batch
from ..telemetry import report_of


def measured_training_flops(
    cfg: ModelConfig, batch_size: int, seq_len: int, capacities: Optional[Sequence[float]] = None
) -> int:
    """Forward + backward FLOPs of one batch as torch counts them, on a meta-device model (its routed
    blocks at ``capacities``, by default their configured ones)."""
    with torch.device("meta"):
        model = MoDTransformer(cfg)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for block, capacity in zip(model.routed_blocks(), capacities or []):
        block.router.capacity = capacity

    def forward():
        out = model(idx, routing="topk")
        return out.logits.float().sum() + out.aux_loss

    return measure_flops(model, forward, loss_fn=lambda loss: loss)


class FlopsMeter(Callback):
    def __init__(self, peak_flops: Optional[float] = None, tolerance: float = 0.02):
        """FLOPs of every optimizer step, their running total and the MoD/dense ratio (``flops/*``).

        Args:
            peak_flops: The device's peak FLOP/s per rank, for ``flops/mfu`` where Lightning's device
                table has none (CPUs, new GPUs); unset: no ``flops/mfu``.
            tolerance: How far the analytic FLOPs of the first batch may differ from torch's count of
                it (a fraction) before the run warns.
        """
        self.peak_flops = peak_flops
        self.tolerance = tolerance
        self.total = 0.0
        self._pending = 0.0  # micro-batches of the step being accumulated
        self._ratio_vs_dense: Optional[float] = None  # set by the first-step cross-check
        self._t_last: Optional[float] = None  # host clock at the last logged step
        self._since_last = 0.0  # FLOPs of the steps since then

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = report_of(outputs)
        if report is None:
            return
        cfg = pl_module.model.config
        batch_size, seq_len = split_batch(batch)[0].shape
        tokens = report.routed_tokens or None
        if self._ratio_vs_dense is None:
            self._cross_check(pl_module, cfg, batch_size, seq_len)
        self._ratio_vs_dense = flops_ratio_vs_dense(cfg, seq_len, tokens_per_routed_block=tokens)
        # The step's analytic count of this batch (top-k training: exactly k tokens per routed
        # block), read without touching the routing tensors, so no device sync per step.
        self._pending += report.flops * trainer.world_size
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # the optimizer step is not done yet
        step_flops, self._pending = self._pending, 0.0
        self.total += step_flops
        self._since_last += step_flops
        if trainer.global_step % max(1, trainer.log_every_n_steps):
            return  # only logging steps reach the logger: logging others would cost a host-to-device copy each
        metrics = {tags.FLOPS_STEP: step_flops, tags.FLOPS_TOTAL: self.total, tags.FLOPS_RATIO: self._ratio_vs_dense}
        if self.peak_flops and torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the steps since the last log are done: the clock means something
        now = time.perf_counter()
        if self.peak_flops and self._t_last is not None:
            # the mean over the steps since the last logged one: no sync between them
            metrics[tags.FLOPS_MFU] = self._since_last / (now - self._t_last) / (self.peak_flops * trainer.world_size)
        self._t_last, self._since_last = now, 0.0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def _cross_check(self, pl_module, cfg, batch_size, seq_len) -> None:
        routed = pl_module.model.routed_blocks()
        capacities = [block.router.capacity for block in routed]
        tokens = [block.router.topk_tokens(seq_len) for block in routed] or None
        measured = measured_training_flops(cfg, batch_size, seq_len, capacities)
        analytic = batch_size * training_flops(cfg, seq_len, tokens_per_routed_block=tokens)
        for logger in pl_module.loggers:
            logger.log_metrics({tags.FLOPS_MEASURED: measured, tags.FLOPS_ANALYTIC: analytic}, step=0)
        if abs(analytic / measured - 1) > self.tolerance:
            rank_zero_warn(
                f"analytic FLOPs {analytic:.4g} differ from measured {measured:.4g} by more than {self.tolerance:.0%}"
            )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t_last, self._since_last = None, 0.0  # do not count data start-up time as step time

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t_last, self._since_last = None, 0.0  # nor validation

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total = state_dict["total"]
