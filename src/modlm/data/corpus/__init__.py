"""Corpora: what a ``--data.source`` string names, opened (``open_corpus``).

- base.py: the interface every kind implements (``Corpus``) and the text kinds' shared part (``TextCorpus``);
- files.py: ``FileCorpus``, local files and ``stdlib`` (readers.py reads their formats);
- hub.py: ``HubCorpus``, a Hugging Face dataset streamed at a pinned commit;
- prepared.py: ``PreparedCorpus``, a folder of token shards written by ``python -m modlm.prepare``;
- chat.py: ``ChatCorpus``, conversations read record by record from files or a hub dataset;
- split.py: the train/validation split of documents.
"""

from typing import Optional

from ..chat import is_chat_record
from ..errors import DataError
from .base import Corpus, TextCorpus
from .chat import ChatCorpus
from .files import FileCorpus, discover
from .hub import HubCorpus
from .prepared import PreparedCorpus, is_prepared
from .readers import JSON_SUFFIXES, read_records
from .storage import format_suffix


def files_hold_chats(source: str, text_field: str) -> bool:
    """Whether local files (or files at a URL) are chat data: their first jsonl/json record is a
    conversation with no ``text_field`` (then every file must be jsonl or json)."""
    import json

    _, files = discover(source)
    first = next((f for f in files if format_suffix(f) in JSON_SUFFIXES), None)
    if first is None:
        return False
    record = next(iter(read_records(first, None, 0, 1)), (0, ""))[1]
    try:
        chat = is_chat_record(json.loads(record), text_field)
    except json.JSONDecodeError:
        return False
    others = [f for f in files if format_suffix(f) not in JSON_SUFFIXES]
    if chat and others:
        raise DataError(
            f"data source {source!r} holds conversations, and {others[0]} is no .jsonl or .json file of them"
        )
    return chat


def holds_chats(source: str, text_field: str) -> bool:
    """Whether ``source`` is chat data (files, or a hub dataset, whose first record is a conversation)."""
    if is_prepared(source):
        return False
    if source.startswith("hub:"):
        hub = HubCorpus(source, text_field=text_field, val_fraction=0.0, seed=0)
        return is_chat_record(hub.first_row(), text_field)
    return files_hold_chats(source, text_field)


def _opened(
    source: str, *, text_field: str, val_fraction: float, seed: int, min_val_chars: int
) -> tuple[TextCorpus, bool]:
    """``source`` opened, and whether it is chat data (then read record by record)."""
    if source.startswith("hub:"):
        corpus = HubCorpus(source, text_field=text_field, val_fraction=val_fraction, seed=seed)
        chat = is_chat_record(corpus.first_row(), text_field)
        return (corpus.as_records() if chat else corpus), chat
    if files_hold_chats(source, text_field):
        return FileCorpus(source, text_field=None, val_fraction=val_fraction, seed=seed, min_val_chars=0), True
    return FileCorpus(
        source, text_field=text_field, val_fraction=val_fraction, seed=seed, min_val_chars=min_val_chars
    ), False


def open_corpus(
    source: str,
    *,
    text_field: str,
    val_fraction: float,
    seed: int,
    min_val_chars: int,
    seq_len: Optional[int] = None,
    val_source: Optional[str] = None,
    chat_template: Optional[str] = None,
) -> Corpus:
    """The corpus a ``--data.source`` string names: a prepared folder of token shards, conversations (jsonl/json
    files or a hub dataset of chat records: ``ChatCorpus``, its windows ``seq_len + 1`` tokens, validated on
    ``val_source`` when given, rendered with ``chat_template`` when given), a hub dataset (failing fast when
    offline) or local files. ``text_field`` and ``val_fraction`` do not apply to a prepared folder (they
    were fixed when it was prepared)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source {source!r}: expected a path, glob, 'stdlib' or 'hub:NAME[:CONFIG]'")
    if is_prepared(source):
        if val_source:
            raise DataError(
                "--data.val_source holds out conversations of chat data; a prepared folder has its "
                "validation tokens already"
            )
        return PreparedCorpus(source, seed=seed)
    records, chat = _opened(
        source,
        text_field=text_field,
        val_fraction=0.0 if val_source else val_fraction,
        seed=seed,
        min_val_chars=min_val_chars,
    )
    if not chat:
        if val_source:
            raise DataError(
                f"--data.val_source holds out conversations of chat data, and {source!r} holds documents "
                "(their validation is --data.val_fraction of them)"
            )
        return records
    held_out = None
    if val_source:
        held_out, chat = _opened(val_source, text_field=text_field, val_fraction=0.0, seed=seed, min_val_chars=0)
        if not chat:
            raise DataError(
                f"--data.val_source {val_source!r} holds no conversations (records with 'messages', or "
                "'prompt' and 'completion')"
            )
    if seq_len is None:
        raise DataError(
            f"data source {source!r} holds conversations, which are read as they are, one per window (not prepared)"
        )
    return ChatCorpus(records, held_out, seq_len=seq_len, chat_template=chat_template)


__all__ = [
    "ChatCorpus",
    "Corpus",
    "FileCorpus",
    "HubCorpus",
    "PreparedCorpus",
    "TextCorpus",
    "holds_chats",
    "open_corpus",
]
