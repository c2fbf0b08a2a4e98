"""``ModLMTrainer``: Lightning's ``Trainer`` whose every checkpoint is calibrated and written atomically.

Every save of a run goes through ``Trainer.save_checkpoint`` (``ModelCheckpoint``'s, the pre-emption
callback's, a user's own call), so that one method covers them all with no change to Lightning's
callbacks. First the routers' causal decisions are calibrated on the run's validation windows
(``MoDLightningModule.calibrate``): their thresholds are buffers of the model, so the weights written carry
thresholds fitted to these very weights (Lightning takes the state dict before any checkpoint hook
runs, so this cannot wait for one). Then the save is atomic (``checkpoint.save_atomically``: a hidden
name, then a rename): a job killed mid-save keeps its previous ``last.ckpt``, and a ``last.ckpt`` link
is replaced, never written through. Everything else is Lightning's Trainer, argument for argument.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl

from .checkpoint import save_atomically


class ModLMTrainer(pl.Trainer):
    def save_checkpoint(
        self, filepath, weights_only: Optional[bool] = False, storage_options: Optional[Any] = None
    ) -> None:
        """``Trainer.save_checkpoint`` of a calibrated model, written under a hidden name and renamed onto
        ``filepath`` when complete (call it on every rank, as Lightning's)."""
        calibrate = getattr(self.lightning_module, "calibrate", None)
        if callable(calibrate):  # modlm's module: its routers' decisions fitted to the weights about to be saved
            calibrate()
        save_atomically(
            self, filepath, lambda partial: pl.Trainer.save_checkpoint(self, partial, weights_only, storage_options)
        )
