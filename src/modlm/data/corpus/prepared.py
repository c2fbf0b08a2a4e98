"""Prepared folders: a corpus tokenized once (``python -m modlm.prepare``), trained from many times.

A prepared folder (written by ``modlm.data.prepare``) holds

    meta.json        what the folder is (format, token dtype, tokenizer hash, shard sizes), written last
    tokenizer.json   the tokenizer the tokens were made with
    train-00000.bin  the training documents' tokens, each document followed by <|endoftext|>,
    ...              cut into shard files of ``shard_tokens`` tokens (raw little-endian uint16/uint32)
    val-00000.bin    the validation documents' tokens, the same way
    val-loss-mask.bin  (optional) which validation targets carry the loss, one byte each, for windows of
                     ``meta["val_loss_mask"]["seq_len"] + 1`` tokens: a checkpoint's chat windows unpacked
                     (``modlm.saved.travel.unpack``)

``PreparedCorpus`` opens one, checking every shard and the tokenizer against ``meta.json``; its
training stream is the token stream (stream/tokens.py), which reads no text and runs no tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from ..errors import DataError
from ..stream.tokens import TokenStream
from ..tokenizer import TOKENIZER_FILE, TokenizerSettings, fingerprint, fingerprint_json, load_tokenizer, open_tokenizer
from .base import Corpus

FORMAT = "modlm-token-shards"
VERSION = 1
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def is_prepared(folder) -> bool:
    """True for a folder ``prepare`` wrote, or began writing (then ``PreparedCorpus`` names the problem)."""
    p = Path(folder)
    return p.is_dir() and ((p / META_FILE).is_file() or any(p.glob("train-*.bin")))


class TokenArray:
    """Shard files read as one array of tokens (memory-mapped; the OS page cache does the caching)."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype):
        self.maps = [
            np.memmap(p, dtype=dtype, mode="r", shape=(c,)) if c else np.zeros(0, dtype) for p, c in zip(paths, counts)
        ]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.size = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        pieces, at, end = [], start, start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while at < end:
            lo = at - self.starts[shard]
            take = min(end, self.starts[shard + 1]) - at
            pieces.append(self.maps[shard][lo : lo + take])
            at += take
            shard += 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)


class PreparedCorpus(Corpus):
    """A prepared folder, checked: every shard present with the size ``meta.json`` records.

    ``seed`` draws the epochs' window order (the folder itself has no order)."""

    def __init__(self, folder, *, seed: int):
        self.folder = Path(folder)
        self.source = str(folder)
        self.seed = seed
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise DataError(
                f"prepared folder {self.source!r} is half-written (no {META_FILE}, which prepare "
                "writes last); run prepare again into a new folder"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"prepared folder {self.source!r}: {META_FILE} is not valid JSON ({e.msg})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(
                f"{self.source!r} is not a prepared folder of this version "
                f"(format {self.meta.get('format')!r} v{self.meta.get('version')}; expected {FORMAT!r} v{VERSION})"
            )
        self.dtype = np.dtype(self.meta["dtype"])
        for split in ("train", "val"):
            for name, count in zip(self.meta[split]["files"], self.meta[split]["tokens"]):
                path = self.folder / name
                want = count * self.dtype.itemsize
                if not path.is_file() or path.stat().st_size != want:
                    have = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                    raise DataError(
                        f"prepared folder {self.source!r}: shard {name} is {have}, expected {want} bytes; "
                        "run prepare again"
                    )
        tok = self.folder / TOKENIZER_FILE
        if not tok.is_file() or fingerprint_json(tok.read_text()) != self.meta["tokenizer_sha256"]:
            raise DataError(
                f"prepared folder {self.source!r}: {TOKENIZER_FILE} is missing or not the one its tokens "
                "were made with; run prepare again"
            )
        self.num_train_tokens = sum(self.meta["train"]["tokens"])
        self.num_train_docs = self.meta["documents"]["train"]
        self.num_val_docs = self.meta["documents"]["val"]

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / TOKENIZER_FILE

    def check_tokenizer(self, tok: Tokenizer, where: str) -> None:
        """Refuse a tokenizer other than the one the shards were made with."""
        if fingerprint(tok) != self.meta["tokenizer_sha256"]:
            raise DataError(
                f"prepared folder {self.source!r} was tokenized with another tokenizer than {where} "
                f"(fingerprints {self.meta['tokenizer_sha256'][:12]} and {fingerprint(tok)[:12]}); "
                "drop --data.tokenizer or prepare the corpus again with it"
            )

    def tokenizer(self, settings: TokenizerSettings) -> tuple[Tokenizer, Path]:
        """The folder's own tokenizer; another one named explicitly is refused. Of the settings only
        ``tokenizer`` matters: the tokens exist already."""
        if settings.tokenizer:
            self.check_tokenizer(open_tokenizer(settings.tokenizer)[0], repr(settings.tokenizer))
        return load_tokenizer(self.tokenizer_file), self.tokenizer_file

    def tokens(self, split: str) -> TokenArray:
        files = [self.folder / name for name in self.meta[split]["files"]]
        return TokenArray(files, self.meta[split]["tokens"], self.dtype)

    def describe(self) -> str:
        return (
            f"{self.source} (prepared from {self.meta.get('source')}: {self.num_train_tokens:,} train / "
            f"{sum(self.meta['val']['tokens']):,} val tokens)"
        )

    def train_stream(
        self, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int
    ) -> TokenStream:
        return TokenStream(
            self, seq_len, batch_size, self.seed, rank=rank, world_size=world_size, num_workers=num_workers
        )

    def val_windows(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> torch.Tensor:
        """The first ``max_windows`` windows of the validation tokens, as a text corpus cuts them."""
        val = self.tokens("val")
        n = min(max_windows, val.size // (seq_len + 1))
        if n == 0:
            raise DataError(
                f"prepared folder {self.source!r}: the validation split has fewer than seq_len + 1 = "
                f"{seq_len + 1} tokens; prepare it with a larger --val_fraction"
            )
        return torch.from_numpy(val.read(0, n * (seq_len + 1)).reshape(n, seq_len + 1))

    def val_loss_mask(self, tokenizer: Tokenizer, seq_len: int, max_windows: int) -> Optional[torch.Tensor]:
        """The stored loss mask of the validation windows (chat windows a checkpoint carried), None without."""
        stored = self.meta.get("val_loss_mask")
        if stored is None:
            return None
        if stored["seq_len"] != seq_len:
            raise DataError(
                f"prepared folder {self.source!r} holds conversations in windows of seq_len "
                f"{stored['seq_len']}, not {seq_len}: leave --data.seq_len out"
            )
        n = min(max_windows, stored["windows"])
        mask = np.fromfile(self.folder / stored["file"], dtype=np.uint8, count=n * seq_len)
        return torch.from_numpy(mask.astype(bool).reshape(n, seq_len))


__all__ = ["FORMAT", "META_FILE", "VERSION", "PreparedCorpus", "TokenArray", "is_prepared", "token_dtype"]
