"""Find the TensorBoard writer among a trainer's loggers (histograms and images need it)."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_writer(trainer) -> Optional["SummaryWriter"]:  # noqa: F821
    """The ``SummaryWriter`` of the first TensorBoard logger, on global rank 0 only, else None."""
    if trainer.global_rank != 0:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
