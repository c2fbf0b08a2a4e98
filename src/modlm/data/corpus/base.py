"""The corpus interface: what the data module and the prepare command ask of an opened source.

A ``Corpus`` is a ``--data.source`` opened (files indexed and split, a hub dataset's commit
resolved, a prepared folder checked). Every kind answers the same questions, so its users never
ask which kind they hold:

- ``tokenizer(settings)``: the tokenizer its tokens are made with, and the file that stores it;
- ``train_stream(...)``: one rank's endless training stream (a ``stream.base.TrainStream``);
- ``val_windows(...)``: the fixed validation windows, the same on every run (``val_loss_mask(...)``: which of
  their targets carry the loss, for chat data);
- ``pins()`` / ``check_pins(pins)``: what a checkpoint records of the data it read, and the refusal
  of a resumed run that would read other data.

``TextCorpus`` is the kinds made of text documents (local files, a hub dataset): they train a
tokenizer on their training documents (or load one), tokenize while training, and share their
training documents out among parts.

Parts. A part is the share of the training documents one logical dataloader worker reads: logical
worker w of rank r reads part ``r * workers + w`` of ``world_size * workers``. ``part_docs`` yields
a part's documents of one epoch as ``(position, text)``: in epoch ``e`` the training documents, in
that epoch's shuffled order, have positions 0, 1, 2, ...; the parts are disjoint, together cover the
epoch, and each yields its positions in increasing order, so a part's place in the stream is the
position of its next document, which is all a resume needs (plus a token offset inside that
document, kept by the packer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from ..errors import DataError
from ..stream.base import TrainStream
from ..stream.packing import first_windows
from ..stream.text import TextStream
from ..tokenizer import TokenizerSettings, resolve_tokenizer


class Corpus(ABC):
    """An opened data source: its tokenizer, its training stream per rank, its validation windows."""

    source: str
    """The ``--data.source`` string it was opened from."""
    num_train_docs: Optional[int]
    """Training documents (None when unknown: a stream)."""
    num_val_docs: Optional[int]
    """Validation documents (None when unknown: a stream)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the user: the source and its size."""

    @abstractmethod
    def tokenizer(self, settings: TokenizerSettings) -> tuple[Tokenizer, Path]:
        """The tokenizer of this corpus's tokens and the tokenizer.json it is stored in."""

    @abstractmethod
    def train_stream(
        self, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int
    ) -> TrainStream:
        """Rank ``rank``'s training stream of batches (batch_size, seq_len + 1), from the start;
        DataError when the corpus cannot fill one batch or be shared by this many parts."""

    @abstractmethod
    def val_windows(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
        """The first ``max_windows`` validation windows: LongTensor (n, seq_len + 1), the same on
        every run; DataError when there is not even one."""

    def val_loss_mask(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> Optional[torch.Tensor]:
        """Which targets of ``val_windows`` carry the loss, (n, seq_len) bools; None: all of them (text).
        Chat data's is its assistant tokens."""
        return None

    def pins(self) -> dict:
        """What a checkpoint records beside the stream position, so that a resumed run reads the
        same data (JSON-able; nothing by default)."""
        return {}

    def check_pins(self, pins: dict) -> None:
        """Refuse (DataError) to resume from a checkpoint whose ``pins()`` name other data."""


class TextCorpus(Corpus):
    """A corpus of text documents, split into train and validation, tokenized while training."""

    text_field: str
    """Field (jsonl/json) or column (parquet, hub) holding the text."""
    val_fraction: float
    """Share of documents held out for validation."""
    seed: int
    """Seed of the per-epoch shuffle of training documents."""
    max_train_tokens: Optional[int] = None
    """An upper bound of the training tokens, when one is cheap to know (None: unknown)."""

    @property
    @abstractmethod
    def source_id(self) -> str:
        """What identifies this corpus in the tokenizer cache key (and a prepared folder's meta.json)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Changes when the documents change, so that a cached tokenizer is not reused ("" if unknown)."""

    @abstractmethod
    def train_texts(self) -> Iterator[str]:
        """Every training document (what the tokenizer learns from and prepare writes), in a fixed order."""

    @abstractmethod
    def val_texts(self) -> Iterator[str]:
        """Every validation document, in a fixed order: the same tokens every validation run."""

    @abstractmethod
    def part_docs(self, part: int, num_parts: int, epoch: int, start: int = 0) -> Iterator[tuple[int, str]]:
        """(position, text) of part ``part`` of ``num_parts``'s training documents in epoch ``epoch``,
        from position ``start`` on, positions increasing."""

    def tokenizer(self, settings: TokenizerSettings) -> tuple[Tokenizer, Path]:
        return resolve_tokenizer(settings, self)

    def train_stream(
        self, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int
    ) -> TextStream:
        return TextStream(
            self, tokenizer.to_str(), seq_len, batch_size, rank=rank, world_size=world_size, num_workers=num_workers
        )

    def val_windows(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
        """The validation documents packed like training data."""
        rows = first_windows(self.val_texts(), tokenizer, seq_len + 1, max_windows)
        if not rows:
            raise DataError(
                f"data source {self.source!r}: the validation split has fewer than seq_len + 1 = {seq_len + 1} "
                "tokens; raise val_fraction or add documents"
            )
        return torch.from_numpy(np.stack(rows))


__all__ = ["Corpus", "TextCorpus"]
