"""Fixtures the data tests share: a small stdlib corpus and the prepared folder made from it, once
a session (preparing costs seconds)."""

from pathlib import Path

import pytest

from modlm.data.prepare import PrepareSettings, prepare_corpus
from tests.data.helpers import PREPARED_SETTINGS, copy_stdlib

FILES = [
    "bisect.py",
    "colorsys.py",
    "keyword.py",
    "this.py",
    "struct.py",
    "token.py",
    "stat.py",
    "abc.py",
    "copy.py",
    "glob.py",
    "heapq.py",
    "queue.py",
    "string.py",
    "fnmatch.py",
]


@pytest.fixture(scope="session")
def corpus_folder(tmp_path_factory) -> Path:
    return copy_stdlib(tmp_path_factory.mktemp("corpus"), FILES)


@pytest.fixture(scope="session")
def prepared(corpus_folder, tmp_path_factory) -> tuple[Path, Path]:
    """(the prepared folder of ``corpus_folder``, the tokenizer cache it trained into)."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("prep") / "tokens"
    prepare_corpus(
        str(corpus_folder),
        out,
        PrepareSettings(
            tokenizer=None,
            text_field="text",
            cache_dir=str(cache),
            num_proc=2,
            shard_tokens=3000,
            progress=False,
            **PREPARED_SETTINGS,
        ),
    )
    return out, cache
