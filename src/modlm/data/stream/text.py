"""The text stream: one rank's training batches tokenized from text documents while training.

Parts. Logical worker w of rank r reads part `part = r * logical_workers + w` of
`world_size * logical_workers` parts of the training documents (the corpus decides which documents
a part holds: corpus/files.py, corpus/hub.py), tokenizes its documents in batches, packs them into
windows of seq_len + 1 tokens (packing.py) and yields whole batches, each with the worker's place
after it: the packer's `{"epoch", "pos", "offset"}`. Each part cycles through epochs forever; the
document order is reshuffled every epoch with the seed.

Resume. A position is only meaningful for the layout (ranks x workers) that made it, because the
parts depend on it. A checkpoint keeps the position of every rank, with its layout; a run of the
same layout continues exactly, a run of another restarts every part at the beginning of the epoch
the checkpoint had reached (with a DataWarning).
"""

from __future__ import annotations

import warnings
from typing import Iterator, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DataError, DataWarning
from ..tokenizer import encode_documents, in_chunks, tokenizer_from_str
from .base import StreamPosition, TrainStream, other_kind_of_source
from .packing import DOCS_PER_ENCODE, pack_windows


class DocumentParts(Protocol):
    """What the text stream reads of a corpus (``corpus.base.TextCorpus`` has it)."""

    source: str
    num_train_docs: Optional[int]
    max_train_tokens: Optional[int]

    def part_docs(self, part: int, num_parts: int, epoch: int, start: int = 0) -> Iterator[tuple[int, str]]: ...


class TextStream(TrainStream):
    """Endless batches of one rank, tokenized from its parts of a text corpus."""

    def __init__(
        self,
        corpus: DocumentParts,
        tokenizer_json: str,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
    ):
        super().__init__(seq_len, batch_size, rank, world_size, num_workers)
        self.corpus = corpus
        self.tokenizer_json = tokenizer_json
        self.num_parts = world_size * self.logical_workers
        if corpus.num_train_docs is not None and corpus.num_train_docs < self.num_parts:
            raise DataError(
                f"data source {corpus.source!r}: {corpus.num_train_docs} training document(s) cannot be "
                f"shared by {world_size} rank(s) x {self.logical_workers} worker(s); "
                "add documents or lower --data.num_workers"
            )
        need = batch_size * (seq_len + 1)
        bound = corpus.max_train_tokens
        if bound is not None and bound < need:
            raise DataError(
                f"data source {corpus.source!r} is too small for one training batch: at most {bound} tokens, a batch "
                f"holds {batch_size} x {seq_len + 1} = {need}; add text or lower --data.batch_size / --data.seq_len"
            )
        self._tok = None

    def __getstate__(self):  # the Rust tokenizer is rebuilt from JSON in each worker
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = tokenizer_from_str(self.tokenizer_json)
        return self._tok

    # ---- the stream interface ---------------------------------------------------------

    def initial_position(self) -> StreamPosition:
        return StreamPosition([{"epoch": 0, "pos": 0, "offset": 0} for _ in range(self.logical_workers)])

    def starting_at(self, position: StreamPosition) -> TextStream:
        stream = super().starting_at(position)
        stream._tok = self._tok  # the copy left the tokenizer out; share this process's back
        return stream

    def save(self, position: StreamPosition) -> dict:
        """``{"ranks": [position of rank 0, rank 1, ...]}``, each with the layout that made it.

        The positions are gathered from every rank (a collective call): the checkpoint file is
        written by rank 0 alone."""
        mine = {
            **position.to_dict(),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.logical_workers,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
        }
        ranks = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        return {"ranks": ranks}

    def restore(self, saved: dict) -> StreamPosition:
        if "ranks" not in saved:
            raise other_kind_of_source()
        ranks = saved["ranks"]
        saved_workers = ranks[0]["num_workers"]
        if len(ranks) != self.world_size or saved_workers != self.logical_workers:
            # Parts depend on ranks x workers: positions of another layout mean nothing
            # here. Restart at the beginning of the epoch the run had reached.
            epoch = min(w["epoch"] for r in ranks for w in r["workers"])
            warnings.warn(
                f"checkpoint data position is for {len(ranks)} rank(s) x {saved_workers} worker(s), this run "
                f"has {self.world_size} x {self.logical_workers}: restarting the data stream at epoch {epoch}",
                DataWarning,
            )
            start = self.initial_position()
            for w in start.workers:
                w["epoch"] = epoch
            return start
        return StreamPosition.from_dict(ranks[self.rank])

    def worker_batches(self, physical: int, position: StreamPosition) -> Iterator[tuple[torch.Tensor, int, dict]]:
        worker = (physical + position.next_worker) % self.logical_workers
        return self.batches(worker, position.workers[worker])

    # ---- one logical worker's batches -------------------------------------------------

    def part(self, worker: int) -> int:
        return self.rank * self.logical_workers + worker

    def docs(self, worker: int, place: dict) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Tokenized documents of a logical worker's part from `place` on, forever:
        (epoch, pos, ids with end-of-text appended, offset of ids[0] in the document)."""
        part = self.part(worker)
        epoch, start, offset = place["epoch"], place["pos"], place["offset"]
        while True:
            found = 0
            texts = self.corpus.part_docs(part, self.num_parts, epoch, start)
            for chunk in in_chunks(texts, DOCS_PER_ENCODE):
                for (pos, _), ids in zip(chunk, encode_documents(self.tokenizer, [text for _, text in chunk])):
                    base = offset if pos == start else 0
                    found += 1
                    yield epoch, pos, ids[base:], base
            if found == 0 and start == 0:
                raise DataError(
                    f"data source {self.corpus.source!r}: part {part} of {self.num_parts} got no training "
                    f"document in epoch {epoch}; add documents or lower --data.num_workers"
                )
            epoch, start, offset = epoch + 1, 0, 0

    def batches(self, worker: int, place: dict) -> Iterator[tuple[torch.Tensor, int, dict]]:
        """Batches of logical worker `worker`, starting at `place`."""
        windows = pack_windows(self.docs(worker, place), self.seq_len + 1)
        while True:
            rows = []
            for window, place in windows:
                rows.append(window)
                if len(rows) == self.batch_size:
                    break
            yield torch.from_numpy(np.stack(rows)), worker, place


__all__ = ["DocumentParts", "TextStream"]
