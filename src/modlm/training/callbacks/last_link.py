"""``ModelCheckpoint`` whose ``last.ckpt`` is a link to the newest step checkpoint, written safely.

With ``save_last="link"`` Lightning makes ``last.ckpt`` a symbolic link instead of a second full
copy. When it later has to write a full ``last.ckpt`` (a resumed run that ends before its first
scheduled checkpoint), writing to the path would go through the link: a sharded checkpoint
(a folder) would be written into the folder of the step it links to, overwriting that step's
shards. Removing the link first makes the write create a new ``last.ckpt`` and leaves every
step checkpoint as it was.

A step checkpoint is written before the link is made, so the state saved in it names no
``last.ckpt``; Lightning would then take the existing ``last.ckpt`` of the run being resumed for
someone else's and start ``last-v1.ckpt``. A run resumed in the same folder owns that link.
"""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class LinkedLastCheckpoint(ModelCheckpoint):
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.save_last and not self.last_model_path and state_dict.get("dirpath") == self.dirpath:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def _drop_link(self, trainer, filepath: str) -> None:
        """Remove ``filepath`` if it is a link, before a full checkpoint is written there."""
        # rank 0's view on every rank: on a shared disk another rank may already see it removed
        if trainer.strategy.broadcast(os.path.islink(filepath)):
            if trainer.is_global_zero:
                os.remove(filepath)
            trainer.strategy.barrier("modlm_unlink_last")  # no rank writes before the link is gone

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self._drop_link(trainer, filepath)
        super()._save_checkpoint(trainer, filepath)
