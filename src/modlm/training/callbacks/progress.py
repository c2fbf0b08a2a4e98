"""The training progress bar in optimizer steps: ``step 120/400``, not ``Epoch 0/-2``.

A modlm run reads an endless stream, so Lightning's bar, counted in batches of an epoch, shows an
epoch that never ends and a total of -2 (``max_epochs=-1``). This bar counts optimizer steps up to
``max_steps`` (gradient accumulation included), starts a resumed run at its step, and leaves the
metrics Lightning shows beside it (``train/loss``, ``val/loss``) as they are, less the logger's
version number. Validation and test bars are Lightning's.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` counting optimizer steps up to ``max_steps``."""

    @property
    def train_description(self) -> str:
        return "Training step"

    def _steps(self, trainer) -> tuple[int, int | None]:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return trainer.global_step, total

    def _start_at_step(self, trainer) -> None:
        step, total = self._steps(trainer)
        bar = self.train_progress_bar
        bar.total = total
        bar.initial = bar.n = step  # a resumed run starts at its step; its rate counts only its own steps
        bar.refresh()

    def on_train_start(self, trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        self._start_at_step(trainer)  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self._start_at_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, total = self._steps(trainer)
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and step != bar.n and self._should_update(step, total or 0):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the version folder is named once, at the start of the run
        return metrics
