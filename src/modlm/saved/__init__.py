"""Saved models read back, whatever wrote them: checkpoint files, FSDP2 sharded checkpoint folders, export
folders, standard transformers folders, Hugging Face Hub ids (``load_saved``), and what travels with them
(tokenizer, validation windows, data settings). A layer between data and training: the command lines,
the server and the benchmarks read models through it, and training writes what it reads."""

from .files import CheckpointError, checkpoint_damage, is_checkpoint, read_checkpoint, read_sharded, read_sharded_meta
from .load import SavedModel, load_saved, saved_data, unpack_saved

__all__ = [
    "CheckpointError",
    "SavedModel",
    "checkpoint_damage",
    "is_checkpoint",
    "load_saved",
    "read_checkpoint",
    "read_sharded",
    "read_sharded_meta",
    "saved_data",
    "unpack_saved",
]
