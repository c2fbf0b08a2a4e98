"""Corpora: what a ``--data.source`` string names, opened (``open_corpus``).

- base.py: the interface every kind implements (``Corpus``) and the text kinds' shared part (``TextCorpus``);
- files.py: ``FileCorpus``, local files and ``stdlib`` (readers.py reads their formats);
- hub.py: ``HubCorpus``, a Hugging Face dataset streamed at a pinned commit;
- prepared.py: ``PreparedCorpus``, a folder of token shards written by ``python -m modlm.prepare``;
- split.py: the train/validation split of documents.
"""
from ..errors import DataError
from .base import Corpus, TextCorpus
from .files import FileCorpus
from .hub import HubCorpus
from .prepared import PreparedCorpus, is_prepared


def open_corpus(source: str, *, text_field: str, val_fraction: float, seed: int, min_val_chars: int) -> Corpus:
    """The corpus a ``--data.source`` string names: a prepared folder of token shards, a hub dataset
    (failing fast when offline) or local files. ``text_field`` and ``val_fraction`` do not apply to
    a prepared folder (they were fixed when it was prepared)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source {source!r}: expected a path, glob, 'stdlib' or 'hub:NAME[:CONFIG]'")
    if is_prepared(source):
        return PreparedCorpus(source, seed=seed)
    if source.startswith("hub:"):
        return HubCorpus(source, text_field=text_field, val_fraction=val_fraction, seed=seed)
    return FileCorpus(source, text_field=text_field, val_fraction=val_fraction, seed=seed, min_val_chars=min_val_chars)


__all__ = ["Corpus", "FileCorpus", "HubCorpus", "PreparedCorpus", "TextCorpus", "open_corpus"]
