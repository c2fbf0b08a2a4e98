"""The run's ``ModelCheckpoint``: ``last.ckpt`` as a link to the newest step, owned by a resumed run.

With ``save_last="link"`` Lightning makes ``last.ckpt`` a symbolic link to the newest step checkpoint
instead of a second full copy (the trainer, ``modlm.training.trainer.ModLMTrainer``, replaces that link
rather than writing through it when a full ``last.ckpt`` is due). A step checkpoint is written
before the link is made, so the callback state saved in it names no ``last.ckpt``; Lightning would
then take the existing ``last.ckpt`` of the run being resumed for someone else's and start
``last-v1.ckpt``. A run resumed in the same folder owns that link: ``load_state_dict`` says so.
"""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints: Lightning's ``ModelCheckpoint``, with ``last.ckpt`` kept as a link.

    Every argument and behaviour is Lightning's, but for ``last.ckpt``: see the module docstring.
    """

    @property
    def state_key(self) -> str:
        # The parent's key (it embeds the class name), so checkpoints of either class restore its state.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.save_last and not self.last_model_path and state_dict.get("dirpath") == self.dirpath:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
