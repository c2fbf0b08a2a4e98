"""Callbacks a training subprocess loads by name (``--trainer.callbacks+=tests.helpers.callbacks.KillAtStep``,
with the repository root on ``PYTHONPATH``, as ``tests.helpers.run_train`` sets it) to die like a
killed job, be pre-empted like a scheduled one, or diverge, and one that notes a rank's collectives."""

from __future__ import annotations

import collections
import json
import os
import signal
import traceback
from pathlib import Path

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process when ``step`` optimizer steps are done (their checkpoint is on disk,
    since ModelCheckpoint saves at the end of the batch before) - no cleanup, like a pre-emption."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Send ``signal`` (a name: SIGUSR1, SIGTERM) to rank 0's own process while step ``step + 1``
    runs, as a scheduler would; the other ranks get nothing and must learn it from rank 0."""

    def __init__(self, step: int, signal: str = "SIGUSR1"):
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonAtStep(pl.Callback):
    """Make the loss NaN from the step after ``step`` on, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.model.norm.weight.data.fill_(float("nan"))


class CollectiveSpy(pl.Callback):
    """Note every collective this rank calls through ``torch.distributed`` while a training step runs
    (by the step that, when done, has global_step ``step``), with the innermost frame of modlm that
    called it (else of Lightning), and write them to ``<default_root_dir>/collectives-rank<R>.json`` when training ends.

    A collective makes every rank wait for the others, and on a GPU the ones the run's own code calls
    move a host value to the device and read the result back: a host sync. (DDP's gradient buckets
    are all-reduced by its C++ reducer, on the device's stream, and are not seen here.)"""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "reduce_scatter_tensor",
        "gather",
        "scatter",
    )

    def __init__(self):
        self.running = None
        self.seen: dict[int, list[str]] = collections.defaultdict(list)
        self._originals: dict = {}

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name in self.NAMES:
            self._originals[name] = original = getattr(dist, name)
            setattr(dist, name, self._spy(name, original))

    def _spy(self, name, original):
        def spy(*args, **kwargs):
            if self.running is not None:
                stack = traceback.extract_stack()[:-1]
                ours = [f for f in stack if "/modlm/" in f.filename]
                caller = (ours or [f for f in stack if "/torch/" not in f.filename] or [None])[-1]
                where = f" from {caller.name} ({Path(caller.filename).name})" if caller else ""
                self.seen[self.running].append(name + where)
            return original(*args, **kwargs)

        return spy

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.running = trainer.global_step + 1

    def on_train_end(self, trainer, pl_module):
        self.running = None
        path = Path(trainer.default_root_dir) / f"collectives-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.seen))

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}
