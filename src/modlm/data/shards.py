"""Prepared token shards: tokenize a corpus once, train from it many times.

A prepared folder (written by ``python -m modlm.prepare``, see prepare.py) holds

    meta.json        what the folder is (format, token dtype, tokenizer hash, shard sizes), written last
    tokenizer.json   the tokenizer the tokens were made with
    train-00000.bin  the training documents' tokens, each document followed by <|endoftext|>,
    ...              cut into files of ``shard_tokens`` tokens (raw little-endian uint16/uint32)
    val-00000.bin    the validation documents' tokens, the same way

The training stream reads no text and runs no tokenizer. The training tokens, all shards end to end,
are cut into windows of ``seq_len + 1`` tokens (a tail shorter than a window is left out); every
epoch visits all of them once, in an order drawn from (seed, epoch). The run's place in the data is
one number, the windows consumed by all ranks together, ``consumed``: global batch ``g`` of a run
gives rank ``r`` windows ``consumed + (g * world_size + r) * batch_size + j``. That number means the
same thing for any number of ranks or workers, so a run resumes exactly with the same layout and,
with another one, continues with the next unseen windows of the same epoch order.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError

FORMAT = "modlm-token-shards"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


def tokenizer_digest(tokenizer_json: str) -> str:
    """Identity of a tokenizer: the hash of its serialized form (vocabulary, merges, settings)."""
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def is_prepared(folder) -> bool:
    """True for a folder ``prepare`` wrote, or began writing (then ``open_prepared`` names the problem)."""
    p = Path(folder)
    return p.is_dir() and ((p / META_FILE).is_file() or any(p.glob("train-*.bin")))


# --- a stateless shuffle of any number of windows --------------------------------------------------
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray, key: int, round_: int) -> np.ndarray:
    # splitmix64's finalizer on (x, key, round): a fast, well-spread round function.
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15) + np.uint64((key * 0xBF58476D1CE4E5B9 + round_ * 0x94D049BB133111EB) & (2**64 - 1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Entries ``index`` of a pseudo-random permutation of ``range(n)`` drawn from ``key``.

    A 4-round Feistel network on the smallest even number of bits that holds ``n``, cycle-walked
    back into range: a true permutation, computed per entry, so no table of ``n`` entries is kept
    (an epoch of a 100B-token corpus has ~10^8 windows)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & low
        for r in range(4):
            left, right = right, left ^ (_mix(right, key, r) & low)
        return (left << half) | right

    out = feistel(np.asarray(index, dtype=np.uint64))
    while (outside := out >= np.uint64(n)).any():  # at most 4x the range: a few passes
        out[outside] = feistel(out[outside])
    return out.astype(np.int64)


# --- the prepared folder ---------------------------------------------------------------------------
class TokenArray:
    """Shard files read as one array of tokens (memory-mapped; the OS page cache does the caching)."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype):
        self.maps = [np.memmap(p, dtype=dtype, mode="r", shape=(c,)) if c else np.zeros(0, dtype) for p, c in zip(paths, counts)]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.size = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        parts, at, end = [], start, start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while at < end:
            lo = at - self.starts[shard]
            take = min(end, self.starts[shard + 1]) - at
            parts.append(self.maps[shard][lo:lo + take])
            at += take
            shard += 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


class PreparedCorpus:
    """A prepared folder, checked: every shard present with the size ``meta.json`` records."""

    prepared = True

    def __init__(self, folder):
        self.folder = Path(folder)
        self.source = str(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise DataError(f"prepared folder {self.source!r} is half-written (no {META_FILE}, which prepare "
                            "writes last); run prepare again into a new folder")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"prepared folder {self.source!r}: {META_FILE} is not valid JSON ({e.msg})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(f"{self.source!r} is not a prepared folder of this version "
                            f"(format {self.meta.get('format')!r} v{self.meta.get('version')}; expected {FORMAT!r} v{VERSION})")
        self.dtype = np.dtype(self.meta["dtype"])
        for split in ("train", "val"):
            for name, count in zip(self.meta[split]["files"], self.meta[split]["tokens"]):
                path = self.folder / name
                want = count * self.dtype.itemsize
                if not path.is_file() or path.stat().st_size != want:
                    have = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                    raise DataError(f"prepared folder {self.source!r}: shard {name} is {have}, expected {want} bytes; "
                                    "run prepare again")
        tok = self.folder / TOKENIZER_FILE
        if not tok.is_file() or tokenizer_digest(tok.read_text()) != self.meta["tokenizer_sha256"]:
            raise DataError(f"prepared folder {self.source!r}: {TOKENIZER_FILE} is missing or not the one its tokens "
                            "were made with; run prepare again")
        self.num_train_tokens = sum(self.meta["train"]["tokens"])
        self.num_train_docs = self.meta["documents"]["train"]
        self.num_val_docs = self.meta["documents"]["val"]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / TOKENIZER_FILE

    def check_tokenizer(self, tokenizer_json: str, where: str) -> None:
        """Refuse a tokenizer other than the one the shards were made with."""
        if tokenizer_digest(tokenizer_json) != self.meta["tokenizer_sha256"]:
            raise DataError(f"prepared folder {self.source!r} was tokenized with another tokenizer than {where}; "
                            "drop --data.tokenizer_path or prepare the corpus again with it")

    def tokens(self, split: str) -> TokenArray:
        files = [self.folder / name for name in self.meta[split]["files"]]
        return TokenArray(files, self.meta[split]["tokens"], self.dtype)

    def describe(self) -> str:
        return (f"{self.source} (prepared from {self.meta.get('source')}: {self.num_train_tokens:,} train / "
                f"{sum(self.meta['val']['tokens']):,} val tokens)")

    def val_windows(self, seq_len: int, max_windows: int) -> torch.Tensor:
        """The first ``max_windows`` windows of the validation tokens, as the on-the-fly path cuts them."""
        val = self.tokens("val")
        n = min(max_windows, val.size // (seq_len + 1))
        if n == 0:
            raise DataError(f"prepared folder {self.source!r}: the validation split has fewer than seq_len + 1 = "
                            f"{seq_len + 1} tokens; prepare it with a larger --val_fraction")
        return torch.from_numpy(val.read(0, n * (seq_len + 1)).reshape(n, seq_len + 1))


def open_prepared(folder) -> PreparedCorpus:
    return PreparedCorpus(folder)


# --- the training stream -------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Endless (batch, logical worker, position after it) of one rank from prepared shards, used through
    ``ResumableLoader`` like ``PackedTrainStream``. Position ``{"next": b}``: the rank's next batch is
    its ``b``-th since ``consumed``. Worker ``w`` builds the rank's batches ``w, w + n, ...`` (the
    DataLoader's round-robin order), so the batches do not depend on the number of workers either."""

    def __init__(self, corpus: PreparedCorpus, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, consumed: int = 0):
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.logical_workers = num_workers, max(1, num_workers)
        self.consumed = consumed
        self.windows_per_epoch = corpus.num_train_tokens // (seq_len + 1)
        if self.windows_per_epoch < batch_size:
            raise DataError(f"prepared folder {corpus.source!r}: {corpus.num_train_tokens} training tokens cannot fill "
                            f"one batch of {batch_size} x {seq_len + 1}; lower --data.batch_size or --data.seq_len")
        self._start: Optional[dict] = None
        self._tokens: Optional[TokenArray] = None

    def __getstate__(self):  # memory maps are reopened in each worker
        return {**self.__dict__, "_tokens": None}

    def initial_state(self) -> dict:
        return {"workers": [{"next": 0} for _ in range(self.logical_workers)], "next_worker": 0}

    def starting_at(self, state: dict) -> "ShardStream":
        import copy

        stream = copy.copy(self)
        stream._start = copy.deepcopy(state)
        return stream

    @staticmethod
    def next_batch(state: dict) -> int:
        """The rank's next batch after a ``ResumableLoader`` state: one past the newest delivered."""
        return max(w["next"] for w in state["workers"])

    def consumed_after(self, state: dict) -> int:
        """Windows consumed by all ranks once every rank has consumed the batches of ``state``."""
        return self.consumed + self.next_batch(state) * self.world_size * self.batch_size

    def window_ids(self, batch: int) -> np.ndarray:
        """Window numbers (epoch order resolved) of the rank's ``batch``-th batch."""
        k = self.consumed + (batch * self.world_size + self.rank) * self.batch_size + np.arange(self.batch_size)
        epoch, within = np.divmod(k, self.windows_per_epoch)
        out = np.empty_like(k)
        for e in np.unique(epoch):  # a batch spans at most two epochs
            sel = epoch == e
            out[sel] = permute(within[sel], self.windows_per_epoch, key=self.seed * 1_000_003 + int(e))
        return out

    def batch(self, batch: int) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = self.corpus.tokens("train")
        width = self.seq_len + 1
        rows = [self._tokens.read(int(w) * width, width) for w in self.window_ids(batch)]
        return torch.from_numpy(np.stack(rows))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        start = self.next_batch(self._start or self.initial_state())
        b = start + physical
        if physical >= self.logical_workers:
            return
        while True:
            yield self.batch(b), b % self.logical_workers, {"next": b + 1}
            b += self.logical_workers
