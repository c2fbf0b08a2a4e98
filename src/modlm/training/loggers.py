"""TensorBoard plumbing: the run's logger, and its writer for histograms, images and layouts.

Scalars go through Lightning's logging and reach any logger (CSV, W&B, ...). Histograms, the
routing heat map, the dashboard layout and the HParams summary need TensorBoard's writer; under
another logger they are skipped, and the run says so once.

A resumed run logs into its own version folder (the command line passes ``version`` and
``purge_step``, which ``SummaryWriter`` takes: TensorBoard then hides what the killed run logged
after the checkpoint it resumes from), so each tag stays one curve.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

_told = weakref.WeakSet()  # trainers already warned that TensorBoard-only outputs are skipped


class StreamTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without the two cards that never change in a modlm run:
    ``epoch`` (training reads an endless stream, so it stays 0) and ``hp_metric`` (a placeholder
    for a metric modlm does not define), and without internal hyperparameters (``_instantiator``,
    LightningCLI's, and any other ``_`` key). ``log_hparams_summary`` fills TensorBoard's HParams
    tab. Everything else is Lightning's logger unchanged."""

    def __init__(self, *args: Any, default_hp_metric: bool = False, **kwargs: Any):
        # a keyword of its own, so a logger named on the command line gets this default too
        super().__init__(*args, default_hp_metric=default_hp_metric, **kwargs)

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def log_hyperparams(self, params: Any, metrics: Optional[dict] = None, step: Optional[int] = None) -> None:
        if isinstance(params, dict):
            params = {k: v for k, v in params.items() if not str(k).startswith("_")}
        super().log_hyperparams(params, metrics, step)

    @rank_zero_only
    def log_hparams_summary(self, params: dict, metric_tags: list[str]) -> None:
        """TensorBoard's HParams tab: ``params`` (``model/...``, ``data/...``) and the scalar tags that
        are its metrics, declared (TensorBoard shows each tag's latest value, so the table fills
        as the run validates). Only the summary is written: the metrics are the run's own scalars."""
        from torch.utils.tensorboard.summary import hparams

        def plain(value):
            return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

        experiment, start, end = hparams({k: plain(v) for k, v in params.items()}, {tag: 0.0 for tag in metric_tags})
        writer = self.experiment._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)


def tensorboard_writer(trainer) -> Optional["SummaryWriter"]:  # noqa: F821
    """The ``SummaryWriter`` of the first TensorBoard logger, on global rank 0 only, else None.

    The first time a run with loggers but none of them TensorBoard asks, it warns (once per run)
    that histograms, images and the layout are skipped."""
    if trainer.global_rank != 0:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    if trainer.loggers and trainer not in _told:
        _told.add(trainer)
        names = ", ".join(type(logger).__name__ for logger in trainer.loggers)
        rank_zero_warn(
            f"modlm: no TensorBoard logger ({names}): router histograms, the routing heat map "
            "and the dashboard layout are skipped; every scalar is logged as usual"
        )
    return None
