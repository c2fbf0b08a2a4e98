"""Tokens and FLOPs per second: Lightning's ``ThroughputMonitor``, counting tokens, switchable.

Its cards, ``<stage>/<name>`` with ``<stage>`` ``train``, ``val`` or ``test`` (modlm's prefixes:
Lightning names the validation stage ``validate/``, which is renamed here), are:

  train/device/items_per_sec    tokens per second on this device (rates: over the last ``window_size`` logged steps)
  train/device/samples_per_sec  windows (rows) per second, and ``batches_per_sec`` batches
  train/device/flops_per_sec    analytic FLOPs per second (``modlm.flops``); ``train/device/mfu`` where
                                Lightning knows the device's peak
  train/time, train/batches,    running totals of the run: seconds of training (validation excluded),
  train/samples, train/lengths  batches, windows and tokens; a resumed run continues them
  val/...                       the same for each validation of a fit, once per validation at the step
                                ``val/loss`` is logged at (totals restart each validation)
  test/..., val/... of validate the same per batch of a ``test`` or ``validate`` command, at the batch count
  items_per_sec, flops_per_sec  ... with several devices, also every device together (no ``device/``)

Lightning's monitor synchronizes the device after every training batch to time it, a stall of the
launch queue each step; this one counts every batch on the host (shapes and the analytic FLOPs,
no device read) and synchronizes and reads the clock only on the steps that log, so its training
rates are over the last ``window_size`` logged steps (``log_every_n_steps`` apart). Validation and
test batches are timed as Lightning does. ``--throughput.enabled false`` leaves it out of the run
(the CLI drops it from the trainer's callbacks, so nothing of it runs).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from ..batch import batch_size, batch_tokens

STAGE_PREFIX = {
    RunningStage.TRAINING: "train",
    RunningStage.VALIDATING: "val",
    RunningStage.TESTING: "test",
    RunningStage.PREDICTING: "predict",
}
"""The first part of each card's name, per stage: modlm's ``val/`` where Lightning writes ``validate/``."""


class TokenThroughput(ThroughputMonitor):
    def __init__(self, enabled: bool = True, window_size: int = 5):
        """Tokens and FLOPs per second, and MFU where Lightning knows the device's peak.

        Lightning's ``ThroughputMonitor`` with tokens as its items and ``modlm.flops``' FLOPs: training
        rates over the last ``window_size`` logged steps (timed there only: no device sync between),
        validation and test rates over the last ``window_size`` batches.

        Args:
            enabled: Run the monitor (false: it is left out, and nothing of it runs).
            window_size: Timed points the rates span: logged training steps, or evaluation batches.
        """
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.enabled = enabled
        self._resumed: Optional[dict] = None  # training totals of a resumed run, until its training starts
        self._flops_since_update = 0.0  # analytic FLOPs of the training batches since the last timed one

    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING:
            return super()._update(trainer, pl_module, batch, iter_num)
        self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        self._flops_since_update += getattr(pl_module, "flops_per_batch", 0.0) or 0.0
        # Timed exactly where Lightning's monitor logs (``_compute``): a step that logs, its
        # accumulation done. Timing any other batch would need a device sync to mean anything.
        if not trainer._logger_connector.should_update_logs or trainer.fit_loop._should_accumulate():
            return
        self._throughputs[stage].update(
            time=self._synchronized_clock(trainer) - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=self._flops_since_update or None,
        )
        self._flops_since_update = 0.0

    def _synchronized_clock(self, trainer) -> float:
        """The host clock once the device has finished the work queued so far."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _log(self, trainer, stage: RunningStage, step: Optional[int]) -> None:
        """Lightning's computation, logged under modlm's stage prefix (``val/`` for ``validate/``)."""
        throughput = self._throughputs[stage]
        prefix = STAGE_PREFIX.get(stage, stage.value)
        metrics = {f"{prefix}{throughput.separator}{k}": v for k, v in throughput.compute().items()}
        trainer._logger_connector.log_metrics(metrics, step=step)

    @staticmethod
    def _validating_in_fit(trainer) -> bool:
        return trainer.state.stage == RunningStage.VALIDATING and trainer.state.fn == TrainerFn.FITTING

    def _compute(self, trainer, iter_num: Optional[int] = None) -> None:
        if self._validating_in_fit(trainer):
            return  # once per validation, at its end (on the run's step axis, not at a batch count)
        if trainer._logger_connector.should_update_logs:
            self._log(trainer, trainer.state.stage, iter_num)

    @rank_zero_only
    def on_validation_end(self, trainer, *args: Any) -> None:
        if (
            self._validating_in_fit(trainer)
            and not trainer.sanity_checking
            and self._samples.get(RunningStage.VALIDATING)
        ):
            self._log(trainer, RunningStage.VALIDATING, None)  # None: the step val/loss is logged at
        super().on_validation_end(trainer, *args)

    # --- a resumed run continues the running totals --------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        stage = RunningStage.TRAINING
        if stage not in self._t0s:  # not training on this rank (the monitor runs on rank 0 only)
            return dict(self._resumed or {})
        return {
            "time": time.perf_counter() - self._t0s[stage],
            "batches": self._batches[stage],
            "samples": self._samples[stage],
            "lengths": self._lengths[stage],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = dict(state_dict) if state_dict else None

    def _start(self, trainer) -> None:
        super()._start(trainer)
        if trainer.state.stage == RunningStage.TRAINING and self._resumed:
            stage, saved, self._resumed = RunningStage.TRAINING, self._resumed, None
            self._batches[stage], self._samples[stage] = saved["batches"], saved["samples"]
            self._lengths[stage] = saved["lengths"]
            self._t0s[stage] -= saved["time"]  # elapsed training time goes on from the saved one
