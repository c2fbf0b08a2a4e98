"""``ModelCheckpoint`` whose saves can be cut off at any moment without damaging a checkpoint."""
from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from ..checkpoint import save_atomically
from .last_link import LinkedLastCheckpoint


class AtomicModelCheckpoint(LinkedLastCheckpoint):
    """Lightning's ``ModelCheckpoint`` (every argument and behaviour the same, ``last.ckpt`` as a
    link handled as ``LinkedLastCheckpoint`` does) writing each file or sharded folder under a hidden
    name first and renaming it into place when complete (``modlm.checkpoint.save_atomically``): a job
    killed mid-save keeps its previous ``last.ckpt``."""

    @property
    def state_key(self) -> str:
        # The parent's key (it embeds the class name), so checkpoints of either class restore its state.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Same bookkeeping as ModelCheckpoint's, with the write itself made atomic. A link in the way
        # goes first: a sharded folder cannot be renamed onto it.
        self._drop_link(trainer, filepath)
        save_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
