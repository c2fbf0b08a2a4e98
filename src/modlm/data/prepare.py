"""Write a prepared folder (format: corpus/prepared.py): tokenize a text corpus once, in parallel,
into token shards.

Documents are tokenized in chunks by a pool of processes (``multiprocessing``, results kept in
order), each document followed by <|endoftext|>, and appended to fixed-size shard files. Everything
is written into ``<out>.partial`` and renamed to ``<out>`` at the end, ``meta.json`` last: a folder
named ``<out>`` is always complete, and an existing one is never overwritten.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .corpus import open_corpus
from .corpus.prepared import FORMAT, META_FILE, VERSION, PreparedCorpus, is_prepared, token_dtype
from .errors import DataError
from .tokenizer import (
    TOKENIZER_FILE,
    TokenizerSettings,
    encode_documents,
    end_of_text_id,
    fingerprint_json,
    in_chunks,
    tokenizer_from_str,
)

DOCS_PER_TASK = 256  # documents a pool process tokenizes per task (large enough to amortise the hand-off)


@dataclass(frozen=True)
class PrepareSettings:
    """How a corpus is prepared. The settings a training run also has (``--data.*``) mean the same
    there, so a run on the source with them would train or load the same tokenizer."""

    vocab_size: int
    tokenizer: Optional[str]
    text_field: str
    val_fraction: float
    seed: int
    tokenizer_train_chars: int
    cache_dir: Optional[str]
    num_proc: int
    """Tokenizing processes."""
    shard_tokens: int
    """Tokens per shard file."""
    progress: bool
    """Show progress bars."""

    @property
    def tokenizer_settings(self) -> TokenizerSettings:
        return TokenizerSettings(self.tokenizer, self.vocab_size, self.tokenizer_train_chars, self.cache_dir)


_worker_tok = None  # the tokenizer of a pool process


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    _worker_tok = tokenizer_from_str(tokenizer_json)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return encode_documents(_worker_tok, texts)


class ShardWriter:
    """Appends token arrays to ``<split>-NNNNN.bin`` shard files of ``shard_tokens`` tokens each."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.files: list[str] = []
        self.counts: list[int] = []
        self.documents = 0
        self._f = None

    def _open_next(self) -> None:
        if self._f:
            self._f.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self.counts.append(0)
        self._f = open(self.folder / name, "wb")

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
        ids = ids.astype(self.dtype)
        while len(ids):
            if self._f is None or self.counts[-1] == self.shard_tokens:
                self._open_next()
            take = min(len(ids), self.shard_tokens - self.counts[-1])
            self._f.write(ids[:take].tobytes())
            self.counts[-1] += take
            ids = ids[take:]

    def close(self) -> dict:
        if self._f:
            self._f.close()
        return {"files": self.files, "tokens": self.counts}


def prepare_corpus(source: str, out, settings: PrepareSettings) -> PreparedCorpus:
    """Tokenize ``source`` into the prepared folder ``out``; returns it, opened and checked."""
    out = Path(out)
    shard_tokens, num_proc = settings.shard_tokens, settings.num_proc
    if out.exists():
        raise DataError(f"output {str(out)!r} already exists; nothing overwritten (choose a new folder)")
    if shard_tokens < 1 or num_proc < 1:
        raise DataError(f"shard_tokens={shard_tokens}, num_proc={num_proc}: expected >= 1")
    if is_prepared(source):
        raise DataError(f"data source {source!r} is already a prepared folder")
    # No minimum of held-out characters: the window length of the runs to come is not known here.
    corpus = open_corpus(
        source, text_field=settings.text_field, val_fraction=settings.val_fraction, seed=settings.seed, min_val_chars=0
    )
    tok, _ = corpus.tokenizer(settings.tokenizer_settings)
    tokenizer_json = tok.to_str()
    dtype = token_dtype(tok.get_vocab_size())
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # a previous prepare into the same folder was cut off
    partial.mkdir(parents=True)
    (partial / TOKENIZER_FILE).write_text(tokenizer_json)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per pool process
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    splits = {}
    pool = context.Pool(num_proc, _init_worker, (tokenizer_json,)) if num_proc > 1 else None
    try:
        if pool is None:
            _init_worker(tokenizer_json)
        for split, texts, total in (
            ("train", corpus.train_texts(), corpus.num_train_docs),
            ("val", corpus.val_texts(), corpus.num_val_docs),
        ):
            writer = ShardWriter(partial, split, shard_tokens, dtype)
            chunks = in_chunks(texts, DOCS_PER_TASK)
            encoded = pool.imap(_encode, chunks) if pool else map(_encode, chunks)
            bar = _progress(f"prepare {split}", total, settings.progress)
            for docs in encoded:
                for ids in docs:
                    writer.add(ids)
                bar.update(len(docs))
            bar.close()
            splits[split] = writer.close()
            splits[split]["documents"] = writer.documents
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if not sum(splits["train"]["tokens"]):
        shutil.rmtree(partial)
        raise DataError(f"data source {source!r}: no training tokens")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.str,
        "vocab_size": tok.get_vocab_size(),
        "eot_id": end_of_text_id(tok),
        "tokenizer_sha256": fingerprint_json(tokenizer_json),
        "source": source,
        "source_id": corpus.source_id,
        "text_field": settings.text_field,
        "val_fraction": settings.val_fraction,
        "shard_tokens": shard_tokens,
        "documents": {s: splits[s].pop("documents") for s in splits},
        "train": splits["train"],
        "val": splits["val"],
    }
    (partial / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, out)
    return PreparedCorpus(out, seed=settings.seed)


def _progress(desc: str, total: Optional[int], enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, file=sys.stderr, mininterval=1.0)
