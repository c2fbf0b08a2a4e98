"""Tokenizers: modlm's byte-level BPE, trained once per corpus and settings, cached, reused; or a
pretrained one, named by ``--data.tokenizer``.

Byte-level (GPT-2 style) BPE: every string encodes losslessly, so
decode(encode(text)) == text for any text, non-ASCII included. No normalizer, no prefix
space. One special token, <|endoftext|>, separates documents in the packed stream.

A pretrained tokenizer (a ``tokenizer.json``, a folder holding one such as a transformers tokenizer
folder, or a Hugging Face Hub id) is used as it is: its vocabulary sets the model's, and its own
end-of-text token separates documents (``end_of_text``). A tokenizer is identified by its
``fingerprint``, the hash of its serialized form.

The cache lives in `<cache_dir>/<key>/tokenizer.json`, key = hash of the corpus identity
and the settings that change the result. Several ranks may start at once: one trains
(holding an OS file lock, released even if it dies), the others wait for it, and the file is written to a
temporary name then renamed, so nobody ever reads half a tokenizer.
"""

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..model.config import END_OF_TEXT_TOKENS, TOKENIZER_FILE
from ..model.errors import first_line
from .errors import DataError
from .progress import note, show_bars

EOT_TOKEN = END_OF_TEXT_TOKENS[0]
"""The end-of-text token of modlm's own BPE (id 0)."""
ANNOUNCE_CHARS = 1_000_000  # from this much text on, training takes long enough to say so (and show a bar)
_CACHE_FORMAT = 1  # bump when the training recipe changes, to invalidate old caches


def default_cache_dir() -> Path:
    """`data/cache` of the repository when running from a checkout (editable install),
    else `data/cache` under the current directory."""
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file() and (repo / "src" / "modlm").is_dir():
        return repo / "data" / "cache"
    return Path.cwd() / "data" / "cache"


def _prepare(tok: Tokenizer) -> Tokenizer:
    # Treat a literal "<|endoftext|>" inside a document as text, not as a separator
    # (this flag is not stored in tokenizer.json or pickles, so set it on every load).
    tok.encode_special_tokens = True
    return tok


def capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts, cut off after `max_chars` characters in total."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on at most `max_chars` characters of `texts`."""
    if vocab_size < 257:
        raise DataError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 257 (256 bytes + end-of-text)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, always
        show_progress=show_progress,  # on a large corpus training takes minutes: say so
    )
    tok.train_from_iterator(capped(texts, max_chars), trainer=trainer)
    return _prepare(tok)


def end_of_text(tok: Tokenizer) -> str:
    """The token that ends a document (and a generation): the first of ``END_OF_TEXT_TOKENS`` the
    tokenizer has; a DataError when it has none."""
    for token in END_OF_TEXT_TOKENS:
        if tok.token_to_id(token) is not None:
            return token
    raise DataError(
        f"the tokenizer has no end-of-text token (looked for {', '.join(END_OF_TEXT_TOKENS)}): "
        "documents could not be separated nor a generation end"
    )


def end_of_text_id(tok: Tokenizer) -> int:
    return tok.token_to_id(end_of_text(tok))


def fingerprint(tok: Tokenizer) -> str:
    """A tokenizer's identity: the SHA-256 of its serialized form (vocabulary, merges, settings)."""
    return fingerprint_json(tok.to_str())


def fingerprint_json(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer.json and check it has an end-of-text token."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {str(path)!r} does not exist (expected a tokenizer.json file)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"tokenizer {str(path)!r} is not a valid tokenizer.json ({e})") from None
    end_of_text(tok)
    return _prepare(tok)


def _hub_tokenizer_folder(repo_id: str) -> Path:
    """The tokenizer files of a Hub model repository, downloaded (or found in the local Hugging
    Face cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=[TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja"])
        )
    except Exception as e:  # noqa: BLE001 - offline, not found, gated: the user's to fix
        first = first_line(e)
        raise DataError(
            f"tokenizer {repo_id!r}: not a local file or folder, and the Hub cannot give it ({first})"
        ) from None


def open_tokenizer(spec: str) -> tuple[Tokenizer, Path]:
    """The tokenizer ``--data.tokenizer`` names, and the tokenizer.json it was read from: a
    ``tokenizer.json``; a folder holding one (a transformers tokenizer folder, a modlm export or
    prepared folder); or ``hub:OWNER/NAME`` (or plain ``OWNER/NAME``, when no such local path
    exists), a Hugging Face Hub repository whose ``tokenizer.json`` is used."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    elif not path.exists() and (
        spec.startswith("hub:") or spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    ):
        path = _hub_tokenizer_folder(spec.removeprefix("hub:")) / TOKENIZER_FILE
    return load_tokenizer(path), path


def tokenizer_from_str(data: str) -> Tokenizer:
    return _prepare(Tokenizer.from_str(data))


def in_chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of up to `size` items: documents are encoded a list at a time
    (``encode_batch`` runs in parallel, and a process pool's task amortises its hand-off)."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def encode_documents(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each document's tokens followed by the end-of-text token, as int64 arrays: the unit the
    packed stream, the validation windows and a prepared folder are all made of."""
    eot = end_of_text_id(tok)
    return [np.asarray(e.ids + [eot], dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]


def cache_key(source_id: str, fingerprint: str, **settings) -> str:
    blob = json.dumps({"format": _CACHE_FORMAT, "source": source_id, "files": fingerprint, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _atomic_save(tok: Tokenizer, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tok.save(str(tmp))
        os.replace(tmp, target)  # atomic on POSIX and Windows
    finally:
        tmp.unlink(missing_ok=True)


def cached_tokenizer(folder: Path, train, wait_s: float = 3600.0) -> Tokenizer:
    """Load `folder/tokenizer.json`, or make it with `train()` (a function returning a
    Tokenizer) while holding the lock `<folder>.lock`, so only one process trains.

    The lock is an OS file lock (`filelock`): it is released when its holder exits, even by
    SIGKILL, so a crashed run never leaves the others waiting for a stale lock."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / TOKENIZER_FILE
    if target.is_file():
        return load_tokenizer(target)
    lock = folder.with_name(folder.name + ".lock")
    try:
        with FileLock(str(lock), timeout=wait_s):
            if target.is_file():  # written by the process that held the lock before us
                return load_tokenizer(target)
            tok = train()
            _atomic_save(tok, target)
            return tok
    except Timeout:
        raise DataError(
            f"timed out after {wait_s:.0f}s waiting for another process to write {target} (lock {lock})"
        ) from None


@dataclass(frozen=True)
class TokenizerSettings:
    """Which tokenizer a text corpus gets (the data module's settings of the same names)."""

    tokenizer: Optional[str]
    """A pretrained or saved tokenizer to use (``open_tokenizer``); None trains one for the corpus
    (or loads it from the cache)."""
    vocab_size: int
    """Vocabulary size of a trained tokenizer."""
    tokenizer_train_chars: int
    """At most this many characters of training text are trained on."""
    cache_dir: Optional[str]
    """Where trained tokenizers are cached (None: ``default_cache_dir()``)."""


class TrainableCorpus(Protocol):
    """What training a tokenizer reads of a corpus (``corpus.base.TextCorpus`` has it)."""

    text_field: str
    val_fraction: float

    @property
    def source_id(self) -> str: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> str: ...

    def train_texts(self) -> Iterator[str]: ...


def resolve_tokenizer(settings: TokenizerSettings, corpus: TrainableCorpus) -> tuple[Tokenizer, Path]:
    """The tokenizer to use and where it is stored: the one ``settings.tokenizer`` names, or the
    cached one for this corpus and settings (trained on the first call)."""
    if settings.tokenizer:
        return open_tokenizer(settings.tokenizer)
    vocab_size, max_chars = settings.vocab_size, settings.tokenizer_train_chars
    # The key's names and values are those of every earlier version: a cached tokenizer stays found.
    key = cache_key(
        corpus.source_id,
        corpus.fingerprint(),
        vocab_size=vocab_size,
        max_chars=max_chars,
        text_field=corpus.text_field,
        val_fraction=corpus.val_fraction,
    )
    folder = (Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()) / key

    def train() -> Tokenizer:
        slow = max_chars >= ANNOUNCE_CHARS
        if slow:
            note(
                f"training a {vocab_size}-token BPE on up to {max_chars:,} characters of {corpus.describe()} "
                f"(cached in {folder})"
            )
        return train_tokenizer(corpus.train_texts(), vocab_size, max_chars, show_progress=slow and show_bars())

    tok = cached_tokenizer(folder, train)
    return tok, folder / TOKENIZER_FILE
