"""Chat data as a corpus: conversations from jsonl/json files or a hub dataset (``ChatCorpus``).

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or a prompt/completion pair
(``{"prompt": ..., "completion": ...}``), one a line (``modlm.data.chat``). A source whose first record
is one, with no ``text_field``, is chat data (``open_corpus`` decides).

Opened, then checked whole. The records are read by the text corpora's own kinds, whole
(``text_field=None``: ``FileCorpus``, ``HubCorpus.as_records``), so files, folders, globs, URLs,
compression, the hashed split, parts and resume are theirs. Once the tokenizer and its chat template are
known (``tokenizer``, which the data module asks for before anything is trained or written), every record
is read once: a record that is not JSON or not a conversation stops the run with one line naming its line
(``ChatError``); conversations without an assistant turn (nothing to learn) and longer than the window
are left out of training and validation, counted, and reported in one warning.

Windows: one conversation per window (``stream/chat.py`` says why). Validation: the conversations of
``val_source`` (every one, in order), or those the hashed split holds out (``val_fraction``); the first
``max_windows`` that fit. Their loss mask travels with them (``val_loss_mask``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from ..chat import ChatEncoder, chat_template_for
from ..errors import DataError, DataWarning
from ..progress import is_rank_zero, note
from ..stream.chat import ChatStream, conversation_window, parse_conversation
from ..tokenizer import TokenizerSettings, resolve_tokenizer
from .base import Corpus, TextCorpus


@dataclass
class ChatCounts:
    """What reading every record found."""

    train: int = 0
    """Conversations to train on."""
    val: int = 0
    """Conversations to validate on."""
    no_answer: int = 0
    """Left out: no assistant turn (no token to learn)."""
    too_long: int = 0
    """Left out: more tokens than a window."""
    longest: int = 0
    """Tokens of the longest conversation."""


class ChatCorpus(Corpus):
    """Conversations, one per window, loss on the assistant's tokens.

    ``records``: the source read record by record (a ``TextCorpus`` without a text field: each record's
    JSON text); ``val_records``: a held-out source likewise (None: ``records``' hashed split);
    ``chat_template``: ``--data.chat_template`` (None: the tokenizer's, else modlm's default)."""

    def __init__(
        self,
        records: TextCorpus,
        val_records: Optional[TextCorpus],
        *,
        seq_len: int,
        chat_template: Optional[str] = None,
    ):
        self.records, self.val_records = records, val_records
        self.source = records.source
        self.seq_len = seq_len
        self.chat_template_spec = chat_template
        self.num_train_docs = records.num_train_docs
        self.num_val_docs = val_records.num_train_docs if val_records is not None else records.num_val_docs
        self.encoder: Optional[ChatEncoder] = None
        """The tokenizer and its chat template (set by ``tokenizer``)."""
        self.counts: Optional[ChatCounts] = None
        """What reading every record found (set by ``tokenizer``)."""
        self._val: Optional[tuple[int, int, torch.Tensor, torch.Tensor]] = None

    # what resolving a tokenizer reads of a corpus (tokenizer.TrainableCorpus)
    text_field = "messages"
    max_train_tokens = None  # a conversation fills a window whatever its length

    @property
    def val_fraction(self) -> float:
        return self.records.val_fraction

    @property
    def source_id(self) -> str:
        return f"chat:{self.records.source_id}"

    def fingerprint(self) -> str:
        return self.records.fingerprint()

    def describe(self) -> str:
        held = f"validation {self.val_records.source}" if self.val_records is not None else "hashed validation"
        return f"{self.records.describe()}: conversations, {held}"

    def pins(self) -> dict:
        return self.records.pins()

    def check_pins(self, pins: dict) -> None:
        self.records.check_pins(pins)

    # ---- the records -------------------------------------------------------------------

    def _all_records(self) -> Iterator[tuple[str, str, bool]]:
        """(where, JSON text, held out) of every record: the source's, then the held-out source's."""
        for where, text, held_out in self.records.every_record():
            if self.val_records is None or not held_out:  # a held-out source replaces the split's own
                yield where, text, held_out
        if self.val_records is not None:
            for where, text, _ in self.val_records.every_record():
                yield where, text, True

    def train_texts(self) -> Iterator[str]:
        """The training conversations' contents, for a tokenizer trained on them."""
        for where, text, held_out in self._all_records():
            if not held_out:
                yield "\n".join(m["content"] for m in parse_conversation(text, where))

    def val_conversations(self) -> Iterator[list[dict]]:
        """The validation conversations, in order."""
        for where, text, held_out in self._all_records():
            if held_out:
                yield parse_conversation(text, where)

    def part_docs(self, part: int, num_parts: int, epoch: int, start: int = 0) -> Iterator[tuple[int, str]]:
        return self.records.part_docs(part, num_parts, epoch, start)

    # ---- the corpus interface ----------------------------------------------------------

    def tokenizer(self, settings: TokenizerSettings) -> tuple[Tokenizer, Path]:
        """The tokenizer, with the chat template conversations are rendered with (``--data.chat_template``,
        else the one kept beside the tokenizer, else modlm's default, which the run is told about); then
        every record is read once (``check``)."""
        tok, path = resolve_tokenizer(settings, self)
        if self.encoder is None:
            template = chat_template_for(self.chat_template_spec, path)
            if template is None:
                note(
                    f"the tokenizer {path} has no chat template: conversations are rendered with modlm's default "
                    "(docs/fine-tuning.md)"
                )
            self.encoder = ChatEncoder(tok.to_str(), template)
            self.check()
        return tok, path

    def check(self) -> ChatCounts:
        """Read every record once: refuse a bad one (``ChatError`` naming its line), count those left out
        and say so, and refuse data with no conversation to train on."""
        counts, window = ChatCounts(), self.seq_len + 1
        for where, text, held_out in self._all_records():
            ids, loss = self.encoder.encode(parse_conversation(text, where))
            counts.longest = max(counts.longest, len(ids))
            if not any(loss):
                counts.no_answer += 1
            elif len(ids) > window:
                counts.too_long += 1
            elif held_out:
                counts.val += 1
            else:
                counts.train += 1
        self.counts = counts
        left = []
        if counts.no_answer:
            left.append(f"{counts.no_answer:,} without an assistant turn (nothing to learn)")
        if counts.too_long:
            left.append(
                f"{counts.too_long:,} longer than the {window}-token window (the longest has "
                f"{counts.longest:,} tokens: raise --data.seq_len to keep them)"
            )
        if counts.train == 0:
            raise DataError(
                f"data source {self.source!r}: no conversation to train on" + (": " + "; ".join(left) if left else "")
            )
        if is_rank_zero():
            note(
                f"chat data {self.source}: {counts.train:,} conversations to train on, {counts.val:,} to validate on, "
                f"one per {window}-token window"
            )
            if left:
                warnings.warn(
                    f"data source {self.source!r}: left out of training and validation: " + "; ".join(left), DataWarning
                )
        return counts

    def train_stream(
        self, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int
    ) -> ChatStream:
        return ChatStream(
            self, self._encoder(), seq_len, batch_size, rank=rank, world_size=world_size, num_workers=num_workers
        )

    def _encoder(self) -> ChatEncoder:
        if self.encoder is None:
            raise RuntimeError("ChatCorpus.tokenizer() builds the chat encoder; call it first")
        return self.encoder

    def _validation(self, seq_len: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._val is None or self._val[:2] != (seq_len, max_windows):
            encoder, window = self._encoder(), seq_len + 1
            pad = encoder.tokenizer.token_to_id(encoder.special_tokens["pad_token"])
            rows = []
            for messages in self.val_conversations():
                if len(rows) == max_windows:
                    break
                ids, loss = encoder.encode(messages)
                if any(loss) and len(ids) <= window:
                    rows.append(conversation_window(ids, loss, window, pad))
            if not rows:
                raise DataError(
                    f"data source {self.source!r}: no conversation to validate on; give held-out "
                    "conversations with --data.val_source, or raise --data.val_fraction"
                )
            self._val = (
                seq_len,
                max_windows,
                torch.from_numpy(np.stack([t for t, _ in rows])),
                torch.from_numpy(np.stack([m for _, m in rows])),
            )
        return self._val[2], self._val[3]

    def val_windows(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
        """The first ``max_windows`` validation conversations that fit, one a window."""
        return self._validation(seq_len, max_windows)[0]

    def val_loss_mask(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
        """(n, seq_len) bools: which targets of ``val_windows`` are assistant tokens."""
        return self._validation(seq_len, max_windows)[1]


__all__ = ["ChatCorpus", "ChatCounts"]
