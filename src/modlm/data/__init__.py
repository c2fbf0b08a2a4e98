"""Data layer of modlm: corpus sources, a byte-level BPE tokenizer and a streaming,
resumable LightningDataModule.

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
