"""The chat stream: one rank's training batches of conversations, one conversation per window.

A conversation's tokens (``ChatEncoder``: ids, and which of them are assistant tokens) fill one window of
``seq_len + 1`` tokens from its start; the rest of the window is padding, the end-of-text token. A batch is
a dict: ``input_ids`` (B, T), the first T tokens of each window, and ``targets`` (B, T), the next tokens
where they are assistant tokens and ``IGNORE_INDEX`` everywhere else (prompts, role headers, padding), so
the cross-entropy is the mean over the batch's assistant tokens (``chat_batch``).

Why never two conversations in one window: a routed block processes the top-k tokens of its window, so
whether it processes a token depends on every other token of that window. Packed, one conversation would
decide which of another's tokens a block processes (and its tokens would be keys the other attends to). Alone
in a window of fixed length, a conversation's tokens go through the model exactly as they would beside any
other batch mate. The price is the padding's compute (and padding that competes for the top-k slots of its
own window, a fixed function of the conversation): pick ``--data.seq_len`` near the longest conversation.

Parts, positions and resume are the text stream's (``text.py``): a conversation is a document, and a
window never holds part of one, so a worker's place after a batch is the position of its next conversation
(``offset`` 0). Conversations without an assistant token or longer than a window are skipped here; the
corpus counted and reported them when it opened (``corpus/chat.py``).
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import torch

from ...model.config import IGNORE_INDEX
from ..chat import ChatEncoder, ChatError, conversation_of
from ..errors import DataError
from .text import DocumentParts, TextStream


def conversation_window(ids: list[int], loss: list[bool], window: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A conversation as one window: (``window`` int64 tokens, its ids then ``pad_id``; ``window - 1`` bools,
    whether target ``j`` (token ``j + 1``) carries the loss)."""
    tokens = np.full(window, pad_id, dtype=np.int64)
    tokens[: len(ids)] = ids
    mask = np.zeros(window - 1, dtype=bool)
    mask[: len(ids) - 1] = loss[1:]
    return tokens, mask


def chat_batch(windows: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"input_ids": windows[:, :-1], "targets": windows[:, 1:]}`` with ``IGNORE_INDEX`` wherever
    ``loss_mask`` (B, T) is False: what the loss ignores."""
    return {"input_ids": windows[:, :-1], "targets": windows[:, 1:].masked_fill(~loss_mask, IGNORE_INDEX)}


def parse_conversation(text: str, where: str) -> list[dict]:
    """The messages of a record's JSON text; a ChatError naming ``where`` and what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ChatError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    try:
        return conversation_of(record)
    except ChatError as err:
        raise ChatError(f"{where}: {err}") from None


class ChatStream(TextStream):
    """Endless batches of one rank, one conversation per window, of its parts of a chat corpus."""

    def __init__(
        self,
        corpus: DocumentParts,
        encoder: ChatEncoder,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
    ):
        super().__init__(corpus, encoder.tokenizer_json, seq_len, batch_size, rank, world_size, num_workers)
        self.encoder = encoder
        self.pad_id = encoder.tokenizer.token_to_id(encoder.special_tokens["pad_token"])

    def conversations(self, worker: int, place: dict) -> Iterator[tuple[int, int, list[int], list[bool]]]:
        """(epoch, position, ids, assistant flags) of a logical worker's part from ``place`` on, forever:
        the conversations that fit a window and have an answer."""
        part = self.part(worker)
        epoch, start = place["epoch"], place["pos"]
        while True:
            found = 0
            for pos, text in self.corpus.part_docs(part, self.num_parts, epoch, start):
                messages = parse_conversation(text, f"{self.corpus.source} (training conversation {pos})")
                ids, loss = self.encoder.encode(messages)
                if any(loss) and len(ids) <= self.seq_len + 1:
                    found += 1
                    yield epoch, pos, ids, loss
            if found == 0 and start == 0:
                raise DataError(
                    f"data source {self.corpus.source!r}: part {part} of {self.num_parts} holds no "
                    f"conversation to train on in epoch {epoch}; lower --data.num_workers"
                )
            epoch, start = epoch + 1, 0

    def batches(self, worker: int, place: dict) -> Iterator[tuple[dict, int, dict]]:
        """Batches of logical worker ``worker``, starting at ``place``."""
        conversations = self.conversations(worker, place)
        while True:
            windows, masks = [], []
            for epoch, pos, ids, loss in conversations:
                tokens, mask = conversation_window(ids, loss, self.seq_len + 1, self.pad_id)
                windows.append(tokens)
                masks.append(mask)
                if len(windows) == self.batch_size:
                    break
            batch = chat_batch(torch.from_numpy(np.stack(windows)), torch.from_numpy(np.stack(masks)))
            yield batch, worker, {"epoch": epoch, "pos": pos + 1, "offset": 0}


__all__ = ["ChatStream", "chat_batch", "conversation_window", "parse_conversation"]
