"""``ModLMTrainer``: Lightning's ``Trainer`` whose every checkpoint is written atomically.

Every save of a run goes through ``Trainer.save_checkpoint`` (``ModelCheckpoint``'s, the pre-emption
callback's, a user's own call), so making that one method atomic (``checkpoint.save_atomically``:
a hidden name, then a rename) covers them all with no change to Lightning's callbacks: a job killed
mid-save keeps its previous ``last.ckpt``, and a ``last.ckpt`` link is replaced, never written
through. Everything else is Lightning's Trainer, argument for argument.
"""
from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl

from .checkpoint import save_atomically


class ModLMTrainer(pl.Trainer):
    def save_checkpoint(self, filepath, weights_only: Optional[bool] = False,
                        storage_options: Optional[Any] = None) -> None:
        """``Trainer.save_checkpoint``, written under a hidden name and renamed onto ``filepath``
        when complete (call it on every rank, as Lightning's)."""
        save_atomically(self, filepath,
                        lambda partial: pl.Trainer.save_checkpoint(self, partial, weights_only, storage_options))
