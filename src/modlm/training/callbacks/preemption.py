"""Pre-emption: on SIGUSR1 or SIGTERM, every rank saves at the next step boundary, then the run ends.

Why not Lightning's own handlers. Lightning saves ``hpc_ckpt_N.ckpt`` from *inside* the SIGUSR1
handler (SLURM only), i.e. at whatever point each rank happens to be when the signal lands, and the
save runs collectives (the data module gathers every rank's stream position): ranks interrupted at
different points wait for each other forever. Its SIGTERM handler broadcasts from inside the
handler too. Here the handler only records the signal. At a step boundary all ranks agree (one
all-reduce, the same place in every rank's program) whether any rank was signalled; if so they
save together (``trainer.save_checkpoint``, atomic under ``ModLMTrainer``, as every checkpoint of
a run), stop, and (under SLURM, on SIGUSR1) rank 0 requeues the job. A signal reaching one rank
only (a node's agent, a user's ``kill``) is enough.

When: a single process looks at its own flag after every optimizer step (nothing to agree on, no
device read). Several processes agree only after the steps that log (``log_every_n_steps``):
agreeing moves the flag to the device, all-reduces it and reads the result back, a host sync that
would stall every step's launch queue, while a logging step reads the device anyway. So a
multi-process run saves within ``log_every_n_steps`` optimizer steps of the signal: keep the
scheduler's warning (``#SBATCH --signal=SIGUSR1@120``) longer than that many steps and a save.
Lightning's own loop broadcasts its SIGTERM flag before every step of a multi-process run and reads
it back, a host sync per step too; that flag is set only by Lightning's SIGTERM handler, which this
callback replaces, so while it does the broadcast is skipped (``_silence_lightning_sigterm``).

The checkpoint is ``<checkpoint dir>/preempted.ckpt``; ``--ckpt_path last`` picks the newest
checkpoint whichever callback wrote it (``modlm.checkpoint.resolve_last``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

PREEMPTED_NAME = "preempted.ckpt"


class Preemption(pl.Callback):
    """Save on every rank at the next step boundary after a signal, then stop (and requeue).

    Args:
        signals: Signal names that pre-empt the run.
        requeue: Under SLURM, after a SIGUSR1 save, ask SLURM to requeue the job
            (``scontrol requeue $SLURM_JOB_ID``), as ``#SBATCH --signal=SIGUSR1@120`` expects.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True):
        self.signals = tuple(signals)
        self.requeue = requeue
        self.received: Optional[int] = None  # set by the handler: the signal number, nothing else
        self.saved_path: Optional[Path] = None
        self._previous: dict[int, Any] = {}
        self._checked_step = -1
        self._silenced = None  # the loop whose SIGTERM broadcast is skipped, while it is

    # --- the handler does nothing but take note -------------------------------------------------
    def _note(self, signum: int, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its own (at the start of the run), to replace them.
        import threading

        self._checked_step = trainer.global_step  # a resumed run's first boundary is one step on
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._note)
        if signal.SIGTERM in self._previous:
            self._silence_lightning_sigterm(trainer)

    def _silence_lightning_sigterm(self, trainer: pl.Trainer) -> None:
        """Skip the broadcast of Lightning's SIGTERM flag before every step (its training epoch
        loop's ``_broadcast_sigterm_tensor``: rank 0's flag to the device, broadcast, read back on
        every rank). Only Lightning's SIGTERM handler sets that flag, and this callback has just
        replaced it, so the broadcast could only ever say no; a flag set before that stays heard."""
        loop = trainer.fit_loop.epoch_loop
        if hasattr(type(loop), "_broadcast_sigterm_tensor") and not trainer.received_sigterm:
            loop._broadcast_sigterm_tensor = lambda: None
            self._silenced = loop

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._note:
                signal.signal(signum, handler)
        self._previous = {}
        if self._silenced is not None:  # the loop's own method again
            del self._silenced._broadcast_sigterm_tensor
            self._silenced = None

    # --- agree, then save, at a step boundary -------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation: not a step boundary
        self._checked_step = trainer.global_step
        if trainer.world_size > 1 and trainer.global_step % max(1, trainer.log_every_n_steps):
            return  # agreeing is a host sync: only after the steps that log (see the module's docstring)
        # Every rank reaches this point after the same step, so the collective is safe here.
        if not self._anyone(trainer, self.received is not None):
            return
        usr1 = self._anyone(trainer, self.received == signal.SIGUSR1)
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        got = signal.Signals(self.received).name if self.received else "another rank's signal"
        rank_zero_info(
            f"modlm: pre-empted ({got}) after step {trainer.global_step}: saved {path}; resume with --ckpt_path last"
        )
        if usr1 and self.requeue and trainer.is_global_zero:
            self._requeue()
        trainer.should_stop = True

    @staticmethod
    def _anyone(trainer: pl.Trainer, decision: bool) -> bool:
        """Whether any rank's ``decision`` is true: this process's own in a run of one process (a
        strategy would make a device tensor of it even then, and read it back), else all-reduced."""
        if trainer.world_size == 1:
            return decision
        return trainer.strategy.reduce_boolean_decision(decision, all=False)

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> Path:
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        return Path(folder or os.path.join(trainer.default_root_dir, "checkpoints")) / PREEMPTED_NAME

    @staticmethod
    def _requeue() -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job:
            return  # not a SLURM job: nothing to requeue
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            rank_zero_warn(f"modlm: could not requeue SLURM job {job}: {err}")
            return
        if done.returncode == 0:
            rank_zero_info(f"modlm: requeued SLURM job {job}")
        else:
            rank_zero_warn(f"modlm: scontrol requeue {job} failed: {done.stderr.strip()[:200]}")

    def state_dict(self) -> dict[str, Any]:
        return {}
