"""The training stream (sharded, endless, resumable) and the fixed validation windows.

Shards. A rank runs `num_workers` dataloader workers (1 when loading in the main
process); logical worker w of rank r reads shard `slot = r * num_workers + w` of
`world_size * num_workers` (see sources.py), tokenizes its documents in batches, packs
them into windows of seq_len + 1 tokens and yields whole batches, each with the worker's
stream position after it. Each shard cycles through epochs forever; the document order is
reshuffled every epoch with the seed.

Packing (``pack_windows``). Documents arrive already joined with the end-of-text token.
Windows are cut back to back (no overlap, no padding, nothing dropped), so every token of the
stream lands in exactly one window; a document may span several windows and a window several
documents. After each window the packer reports the stream position of the first token it has
not emitted yet, `{"epoch", "pos", "offset"}`: document `pos` of epoch `epoch`, token `offset`
inside it. The packing carry-over (tokens read but not yet emitted) is exactly the tail of the
stream from that position, so the position alone is enough to resume.

Resume. The state of a rank's stream is every logical worker's position plus which worker
delivers the next batch (torch's DataLoader takes batches from its workers round-robin).
A new DataLoader always starts at physical worker 0, so physical worker p plays logical
worker (p + next_worker) % num_workers: the round-robin then continues where it stopped.
"""
import copy
from collections import deque
from itertools import islice
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError
from .tokenizer import EOT_TOKEN, tokenizer_from_str

DOCS_PER_ENCODE = 64  # documents tokenized per encode_batch call


def pack_windows(docs: Iterator[tuple[int, int, np.ndarray, int]], window: int) -> Iterator[tuple[np.ndarray, dict]]:
    """docs: (epoch, pos, token ids, base) where `ids` are the document's tokens from
    offset `base` on (base > 0 only for the document a resumed stream starts in).

    Yields (window of `window` int64 tokens, position after it)."""
    pending: deque = deque()  # [epoch, pos, ids, next index into ids, base]
    buffered = 0
    for epoch, pos, ids, base in docs:
        if len(ids) == 0:
            continue
        pending.append([epoch, pos, ids, 0, base])
        buffered += len(ids)
        while buffered >= window:
            parts, need = [], window
            while need:
                doc = pending[0]
                take = min(need, len(doc[2]) - doc[3])
                parts.append(doc[2][doc[3]:doc[3] + take])
                doc[3] += take
                need -= take
                if doc[3] == len(doc[2]):
                    pending.popleft()
            buffered -= window
            if pending:
                head = pending[0]
                position = {"epoch": head[0], "pos": head[1], "offset": head[4] + head[3]}
            else:  # ended on a document boundary: resume at the next document of the shard
                position = {"epoch": epoch, "pos": pos + 1, "offset": 0}
            yield np.concatenate(parts), position


class PackedTrainStream(IterableDataset):
    """Endless stream of (batch LongTensor (batch_size, seq_len + 1), logical worker id,
    worker position after the batch) for one rank. Used through ResumableLoader."""

    def __init__(self, corpus, tokenizer_json: str, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.corpus = corpus
        self.tokenizer_json = tokenizer_json
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.logical_workers = max(1, num_workers)
        self.num_slots = world_size * self.logical_workers
        if corpus.num_train_docs is not None and corpus.num_train_docs < self.num_slots:
            raise DataError(
                f"data source {corpus.source!r}: {corpus.num_train_docs} training document(s) cannot be "
                f"shared by {world_size} rank(s) x {self.logical_workers} worker(s); "
                "add documents or lower --data.num_workers"
            )
        need = batch_size * (seq_len + 1)
        bound = getattr(corpus, "max_train_tokens", None)
        if bound is not None and bound < need:
            raise DataError(
                f"data source {corpus.source!r} is too small for one training batch: at most {bound} tokens, a batch "
                f"holds {batch_size} x {seq_len + 1} = {need}; add text or lower --data.batch_size / --data.seq_len"
            )
        self._start: Optional[dict] = None  # where iteration begins; see starting_at
        self._tok = None

    def __getstate__(self):  # the Rust tokenizer is rebuilt from JSON in each worker
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = tokenizer_from_str(self.tokenizer_json)
        return self._tok

    def initial_state(self) -> dict:
        return {
            "workers": [{"epoch": 0, "pos": 0, "offset": 0} for _ in range(self.logical_workers)],
            "next_worker": 0,
        }

    def starting_at(self, state: dict) -> "PackedTrainStream":
        """A copy of this stream whose iteration begins at ``state`` (an ``initial_state()``-shaped
        dict), to hand to a DataLoader; this stream is left as it was."""
        stream = copy.copy(self)  # through __getstate__: without the tokenizer, which is shared back
        stream._tok, stream._start = self._tok, copy.deepcopy(state)
        return stream

    def slot(self, worker: int) -> int:
        return self.rank * self.logical_workers + worker

    def docs(self, worker: int, position: dict) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Tokenized documents of a logical worker's shard from `position` on, forever:
        (epoch, pos, ids with end-of-text appended, offset of ids[0] in the document)."""
        slot, eot = self.slot(worker), self.tokenizer.token_to_id(EOT_TOKEN)
        epoch, start, offset = position["epoch"], position["pos"], position["offset"]
        while True:
            found = 0
            texts = self.corpus.slot_docs(slot, self.num_slots, epoch, start)
            for chunk in in_chunks(texts, DOCS_PER_ENCODE):
                encodings = self.tokenizer.encode_batch([text for _, text in chunk], add_special_tokens=False)
                for (pos, _), enc in zip(chunk, encodings):
                    ids = np.asarray(enc.ids + [eot], dtype=np.int64)
                    base = offset if pos == start else 0
                    found += 1
                    yield epoch, pos, ids[base:], base
            if found == 0 and start == 0:
                raise DataError(
                    f"data source {self.corpus.source!r}: shard {slot} of {self.num_slots} got no training "
                    f"document in epoch {epoch}; add documents or lower --data.num_workers"
                )
            epoch, start, offset = epoch + 1, 0, 0

    def batches(self, worker: int, position: dict) -> Iterator[tuple[torch.Tensor, int, dict]]:
        """Batches of logical worker `worker`, starting at `position`."""
        windows = pack_windows(self.docs(worker, position), self.seq_len + 1)
        while True:
            rows = []
            for window, position in windows:
                rows.append(window)
                if len(rows) == self.batch_size:
                    break
            yield torch.from_numpy(np.stack(rows)), worker, position

    def __iter__(self):
        info = get_worker_info()
        physical = 0 if info is None else info.id
        state = self._start or self.initial_state()
        worker = (physical + state["next_worker"]) % self.logical_workers
        return self.batches(worker, state["workers"][worker])


def in_chunks(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of up to `size` items (tokenizers encode a list at once, in parallel)."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def build_val_windows(corpus, tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
    """The first `max_windows` windows of seq_len + 1 tokens of the validation documents,
    packed like training data: LongTensor (n, seq_len + 1), the same on every run."""
    eot = tokenizer.token_to_id(EOT_TOKEN)

    def docs():
        pos = 0
        for chunk in in_chunks(corpus.val_texts(), DOCS_PER_ENCODE):
            for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
                yield 0, pos, np.asarray(enc.ids + [eot], dtype=np.int64), 0
                pos += 1

    rows = [w for w, _ in zip((w for w, _ in pack_windows(docs(), seq_len + 1)), range(max_windows))]
    if not rows:
        raise DataError(
            f"data source {corpus.source!r}: the validation split has fewer than seq_len + 1 = {seq_len + 1} "
            "tokens; raise val_fraction or add documents"
        )
    return torch.from_numpy(np.stack(rows))


class FixedBatches:
    """A sized, re-iterable set of precomputed batches (the validation windows of a rank).

    Not a list, which Lightning would take for several dataloaders; not a DataLoader over
    a map-style dataset, which Lightning would reshard with a DistributedSampler."""

    def __init__(self, windows: torch.Tensor, batch_size: int):
        self.batches = list(windows.split(batch_size)) if len(windows) else []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
