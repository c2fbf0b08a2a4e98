"""The run's ``ModelCheckpoint``: ``last.ckpt`` as a link to the newest step, owned by a resumed run.

With ``save_last="link"`` Lightning makes ``last.ckpt`` a symbolic link to the newest step checkpoint
instead of a second full copy (the trainer, ``modlm.training.trainer.ModLMTrainer``, replaces that link
rather than writing through it when a full ``last.ckpt`` is due). Lightning writes the link relative
(``last.ckpt -> step=0000200.ckpt``), so it survives the run folder being moved or copied.

A run resumed from a checkpoint of its own checkpoint folder is that run going on, wherever the
folder now lives:

* it owns ``last.ckpt``. A step checkpoint is written before the link is made, so the state saved
  in it names no ``last.ckpt``, and Lightning would take the existing one for someone else's and
  start ``last-v1.ckpt``;
* the paths its state holds are the folder's: Lightning compares the absolute ``dirpath`` saved in
  the checkpoint with this one, and after a move or copy drops the saved state (``last_model_path``
  included, so again ``last-v1.ckpt``) with a warning. Here the saved paths are moved into this
  folder first;
* its folder holding checkpoints is expected: Lightning's "Checkpoint directory ... exists and is not
  empty" is kept for a run that starts afresh in a used folder, and only for it.

The state also records the run's TensorBoard log version (``log_version``), so that the command
line can log a resumed run into the same version folder (``saved_log_version``).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import ModelCheckpoint

_NOT_EMPTY = re.compile(r"Checkpoint directory .* exists and is not empty")


def in_folder(ckpt_path, folder) -> bool:
    """Whether ``ckpt_path`` (a file or a sharded checkpoint folder) lies in ``folder`` itself."""
    if not ckpt_path or not folder:
        return False
    try:
        return Path(ckpt_path).absolute().parent.resolve() == Path(folder).resolve()
    except OSError:
        return False


def saved_log_version(checkpoint: dict) -> Optional[Any]:
    """The TensorBoard log version of the run that wrote ``checkpoint`` (None when it names none)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith(ModelCheckpoint.__qualname__) and isinstance(state, dict) and "log_version" in state:
            return state["log_version"]
    return None


def _moved(path: Optional[str], old: str, new: str) -> Optional[str]:
    if not path or not old:
        return path
    rel = os.path.relpath(path, old)
    return path if rel.startswith(os.pardir) else os.path.normpath(os.path.join(new, rel))


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints: Lightning's ``ModelCheckpoint``, with ``last.ckpt`` kept as a link.

    Every argument and behaviour is Lightning's, but for ``last.ckpt``: see the module docstring.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.log_version: Optional[Any] = None
        self._own_run = False  # resuming from a checkpoint of this folder
        self._not_empty: list[warnings.WarningMessage] = []  # Lightning's warning, until we know we resume

    @property
    def state_key(self) -> str:
        # The parent's key (it embeds the class name), so checkpoints of either class restore its state.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings(record=True) as caught:
            super().setup(trainer, pl_module, stage)
        for w in caught:  # anything else Lightning said here is said as it was
            if _NOT_EMPTY.search(str(w.message)):
                self._not_empty.append(w)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if trainer.is_global_zero and trainer.logger is not None:
            self.log_version = trainer.logger.version

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._own_run = in_folder(trainer.ckpt_path, self.dirpath)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        pending, self._not_empty = self._not_empty, []
        if not self._own_run:
            for w in pending:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_version": self.log_version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if self._own_run and old and self.dirpath and old != self.dirpath:  # this run's folder, moved or copied
            new = self.dirpath
            state_dict = {
                **state_dict,
                "dirpath": new,
                **{
                    key: _moved(state_dict.get(key), old, new)
                    for key in ("best_model_path", "kth_best_model_path", "last_model_path")
                },
                "best_k_models": {
                    _moved(path, old, new): score for path, score in (state_dict.get("best_k_models") or {}).items()
                },
            }
        super().load_state_dict(state_dict)
        if self.save_last and not self.last_model_path and state_dict.get("dirpath") == self.dirpath:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
