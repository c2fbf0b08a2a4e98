"""TensorBoard plumbing: the run's logger, and its writer for histograms, images and layouts."""
from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger


class StreamTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without the two cards that never change in a modlm run:
    ``epoch`` (training reads an endless stream, so it stays 0) and ``hp_metric`` (a placeholder
    for a metric modlm does not define). Everything else is Lightning's logger unchanged."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def tensorboard_writer(trainer) -> Optional["SummaryWriter"]:  # noqa: F821
    """The ``SummaryWriter`` of the first TensorBoard logger, on global rank 0 only, else None."""
    if trainer.global_rank != 0:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
