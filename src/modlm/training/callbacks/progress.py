"""The training progress bar in optimizer steps: ``step 120/400``, not ``Epoch 0/-2``.

A modlm run reads an endless stream, so Lightning's bar, counted in batches of an epoch, shows an
epoch that never ends and a total of -2 (``max_epochs=-1``). This bar counts optimizer steps up to
``max_steps`` (gradient accumulation included), starts a resumed run at its step, and shows
``train/loss`` beside it (with ``val/loss`` once the run validates), less the logger's version number.
Validation and test bars are Lightning's.

The loss is a device tensor, and turning it into a number waits for the device to finish the step.
So the module logs it without ``prog_bar`` (Lightning would convert it after every batch), and the
bar reads it only when it refreshes: every ``refresh_rate`` optimizer steps, by default the trainer's
``log_every_n_steps`` (steps that read the device to log anyway), and at the last step.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import TQDMProgressBar

from .. import tags


class StepProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` counting optimizer steps up to ``max_steps``."""

    def __init__(self, refresh_rate: Optional[int] = None, **kwargs: Any):
        # None: the trainer's log_every_n_steps, known at setup
        super().__init__(refresh_rate=refresh_rate or 1, **kwargs)
        self._follow_logging = refresh_rate is None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._follow_logging:
            self._refresh_rate = self._resolve_refresh_rate(max(1, trainer.log_every_n_steps))

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
        loss = trainer.callback_metrics.get(tags.TRAIN_LOSS)  # the latest step's, still on the device
        if loss is not None:
            metrics = {tags.TRAIN_LOSS: f"{float(loss):.3f}", **metrics}  # the one host read, here
        return metrics
