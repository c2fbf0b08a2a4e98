"""Stop training at the first non-finite loss, before it can reach a checkpoint."""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


class NonFiniteLossGuard(pl.Callback):
    """Raise ``NonFiniteLossError`` when the loss of a training step is not finite.

    Checked in ``on_before_backward``, i.e. before the bad loss produces gradients or an optimizer
    update, and before ``ModelCheckpoint`` (which saves at the end of a batch) could write weights
    that the update would have poisoned. An exception ends ``fit`` without saving, so every
    existing checkpoint, ``last.ckpt`` included, is left as it was.

    Under data parallelism the decision is reduced over ranks, so every rank stops at the same
    step instead of the healthy ones waiting forever in the next collective.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            value = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else math.nan
            step = trainer.global_step
            raise NonFiniteLossError(
                f"training loss is {value} at step {step + 1} (global_step={step}); stopped without "
                f"saving, so the existing checkpoints are untouched. Lower --model.lr or check the data."
            )

    def state_dict(self) -> dict[str, Any]:
        return {}
