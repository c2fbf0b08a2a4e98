"""Data layer of modlm: corpora, a byte-level BPE tokenizer, resumable token streams and the
LightningDataModule that joins them.

- corpus/: what a ``--data.source`` names, opened (files, a hub dataset, a prepared folder), behind
  one ``Corpus`` interface;
- stream/: one rank's endless training batches (tokenized text or prepared tokens) behind one
  ``TrainStream`` interface, and the loaders around them;
- tokenizer.py: train, cache and load the tokenizer; order.py: how (seed, epoch) orders the data;
- prepare.py: write a prepared folder (``python -m modlm.prepare``);
- datamodule.py: ``ModLMDataModule``, the owner of the data settings' defaults;
- errors.py, progress.py: the layer's exception and warning types; its notes to the user.

    from modlm.data import ModLMDataModule
    dm = ModLMDataModule(source="stdlib", seq_len=256, batch_size=16)
    dm.tokenizer_vocab_size        # actual vocab size (trains or loads the tokenizer)
    batch = next(iter(dm.train_dataloader()))   # LongTensor (batch_size, seq_len + 1)
    inputs, targets = batch[:, :-1], batch[:, 1:]
"""

from .datamodule import ModLMDataModule
from .errors import DataError, DataWarning
from .tokenizer import EOT_TOKEN

__all__ = ["ModLMDataModule", "DataError", "DataWarning", "EOT_TOKEN"]
