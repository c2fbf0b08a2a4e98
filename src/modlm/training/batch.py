"""What a batch is: ``modlm.analysis.batch`` (the evaluation splits batches too); its names, for training."""

from ..analysis.batch import batch_size, batch_tokens, loss_targets, split_batch

__all__ = ["batch_size", "batch_tokens", "loss_targets", "split_batch"]
