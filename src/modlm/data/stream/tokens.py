"""The token stream: one rank's training batches read from a prepared folder's token shards.

It reads no text and runs no tokenizer. The training tokens, all shards end to end, are cut into
windows of ``seq_len + 1`` tokens (a tail shorter than a window is left out); every epoch visits
all of them once, in an order drawn from (seed, epoch) (``order.permute``). The run's place in the
data is one number, the windows consumed by all ranks together, ``consumed``: global batch ``g`` of
a run gives rank ``r`` windows ``consumed + (g * world_size + r) * batch_size + j``. That number
means the same thing for any number of ranks or workers, so a run resumes exactly with the same
layout and, with another one, continues with the next unseen windows of the same epoch order.

A worker's place is ``{"next": b}``: the rank's next batch is its ``b``-th since ``consumed``.
Worker ``w`` builds the rank's batches ``w, w + n, ...`` (the DataLoader's round-robin order), so
the batches do not depend on the number of workers either.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Protocol

import numpy as np
import torch

from ..errors import DataError, DataWarning
from ..order import epoch_seed, permute
from .base import StreamPosition, TrainStream, other_kind_of_source


class SplitTokens(Protocol):
    """A split's tokens, all shards end to end (``corpus.prepared.TokenArray`` is one)."""

    size: int

    def read(self, start: int, length: int) -> np.ndarray: ...


class TrainTokens(Protocol):
    """What the token stream reads of a prepared corpus."""

    source: str
    num_train_tokens: int

    def tokens(self, split: str) -> SplitTokens: ...


class TokenStream(TrainStream):
    """Endless batches of one rank, read from prepared token shards."""

    def __init__(
        self,
        corpus: TrainTokens,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        consumed: int = 0,
    ):
        super().__init__(seq_len, batch_size, rank, world_size, num_workers)
        self.corpus, self.seed = corpus, seed
        self.consumed = consumed  # windows all ranks consumed before this stream's batch 0
        self.windows_per_epoch = corpus.num_train_tokens // (seq_len + 1)
        if self.windows_per_epoch < batch_size:
            raise DataError(
                f"prepared folder {corpus.source!r}: {corpus.num_train_tokens} training tokens cannot fill "
                f"one batch of {batch_size} x {seq_len + 1}; lower --data.batch_size or --data.seq_len"
            )
        self._tokens = None

    def __getstate__(self):  # memory maps are reopened in each worker
        return {**self.__dict__, "_tokens": None}

    # ---- the stream interface ---------------------------------------------------------

    def initial_position(self) -> StreamPosition:
        return StreamPosition([{"next": 0} for _ in range(self.logical_workers)])

    @staticmethod
    def next_batch(position: StreamPosition) -> int:
        """The rank's next batch after ``position``: one past the newest delivered."""
        return max(w["next"] for w in position.workers)

    def save(self, position: StreamPosition) -> dict:
        """``{"consumed", "seq_len", "tokens"}``: the windows all ranks consumed, and as tokens.

        Every rank knows the one number (ranks run in lockstep): nothing to gather."""
        consumed = self.consumed + self.next_batch(position) * self.world_size * self.batch_size
        return {"consumed": consumed, "seq_len": self.seq_len, "tokens": consumed * (self.seq_len + 1)}

    def restore(self, saved: dict) -> StreamPosition:
        """Moves this stream's origin to the saved point and returns the position at it."""
        if "consumed" not in saved:
            raise other_kind_of_source()
        consumed = saved["consumed"]
        if saved["seq_len"] != self.seq_len:  # other windows: continue at the same token count
            consumed = saved["tokens"] // (self.seq_len + 1)
            warnings.warn(
                f"checkpoint windows have seq_len {saved['seq_len']}, this run {self.seq_len}: continuing "
                f"after the same number of tokens ({saved['tokens']:,})",
                DataWarning,
            )
        self.consumed = consumed
        return self.initial_position()

    def worker_batches(self, physical: int, position: StreamPosition) -> Iterator[tuple[torch.Tensor, int, dict]]:
        if physical >= self.logical_workers:
            return
        b = self.next_batch(position) + physical
        while True:
            yield self.batch(b), b % self.logical_workers, {"next": b + 1}
            b += self.logical_workers

    # ---- which windows a batch holds --------------------------------------------------

    def window_ids(self, batch: int) -> np.ndarray:
        """Window numbers (epoch order resolved) of the rank's ``batch``-th batch."""
        k = self.consumed + (batch * self.world_size + self.rank) * self.batch_size + np.arange(self.batch_size)
        epoch, within = np.divmod(k, self.windows_per_epoch)
        out = np.empty_like(k)
        for e in np.unique(epoch):  # a batch spans at most two epochs
            sel = epoch == e
            out[sel] = permute(within[sel], self.windows_per_epoch, key=epoch_seed(self.seed, int(e)))
        return out

    def batch(self, batch: int) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = self.corpus.tokens("train")
        width = self.seq_len + 1
        rows = [self._tokens.read(int(w) * width, width) for w in self.window_ids(batch)]
        return torch.from_numpy(np.stack(rows))


__all__ = ["TokenStream", "TrainTokens"]
