"""Callbacks a training subprocess loads by name (``--trainer.callbacks+=tests.helpers.callbacks.KillAtStep``,
with the repository root on ``PYTHONPATH``, as ``tests.helpers.run_train`` sets it) to die like a
killed job, be pre-empted like a scheduled one, or diverge."""
from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process when ``step`` optimizer steps are done (their checkpoint is on disk,
    since ModelCheckpoint saves at the end of the batch before) - no cleanup, like a pre-emption."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Send ``signal`` (a name: SIGUSR1, SIGTERM) to rank 0's own process while step ``step + 1``
    runs, as a scheduler would; the other ranks get nothing and must learn it from rank 0."""

    def __init__(self, step: int, signal: str = "SIGUSR1"):
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonAtStep(pl.Callback):
    """Make the loss NaN from the step after ``step`` on, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.model.norm.weight.data.fill_(float("nan"))
