"""Stop training at a non-finite loss, before it can reach a checkpoint, without a sync per step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


class NonFiniteLossGuard(pl.Callback):
    """Raise ``NonFiniteLossError``, naming the first step whose loss was not finite.

    Watching costs no host synchronisation: each step's loss is checked on the device, where the
    first bad step is remembered (``on_before_backward``). The host reads that record only when it
    is about to act on the run's state anyway: on the steps that log (``log_every_n_steps``), before
    every checkpoint is written (so no update made from a bad loss ever reaches a checkpoint: the
    save is refused and every existing checkpoint, ``last.ckpt`` included, is left as it was), and
    when training ends. Between two reads a diverged run may take a few more steps, whose weights
    are never saved. Under data parallelism the decision is reduced over ranks at the read, so every
    rank stops at the same step instead of the healthy ones waiting forever in the next collective.
    """

    def __init__(self):
        self._first_bad: torch.Tensor | None = None  # on the device: (the first bad step or -1, its loss)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(-1)[:1].reshape(())
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        new = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        here = torch.stack([torch.full_like(loss, trainer.global_step), loss])
        self._first_bad = torch.where(new, here, self._first_bad)

    def _check(self, trainer: pl.Trainer) -> None:
        """Read the device-side record (a sync, at the moments named above); raise if a step was bad."""
        record = (
            self._first_bad
            if self._first_bad is not None
            else torch.tensor([-1.0, 0.0], device=trainer.strategy.root_device)
        )
        if trainer.world_size > 1:  # the earliest bad step of any rank (-1: none) decides for all
            steps = trainer.strategy.all_gather(record)
            bad = steps[steps[:, 0] >= 0]
            record = bad[bad[:, 0].argmin()] if len(bad) else record
        step, value = record.tolist()
        if step >= 0:
            step = int(step)
            raise NonFiniteLossError(
                f"training loss is {value} at step {step + 1} (global_step={step}); stopped without saving, so "
                "the existing checkpoints are untouched. Lower --model.lr or check the data."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check(trainer)  # before the file is written: the save is refused

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {}
