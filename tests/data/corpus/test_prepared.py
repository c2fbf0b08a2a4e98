"""Prepared folders: a damaged or half-written one, or a run naming another tokenizer, is a one-line
DataError that says what to do."""

import shutil

import pytest

from modlm.data import DataError
from tests.data.helpers import prepared_dm


def test_bad_prepared_folders_are_one_line_errors(prepared, tmp_path, corpus_folder):
    out, cache = prepared
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "train-00001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="train-00001.bin is 10 bytes"):
        prepared_dm(broken, cache).corpus
    (broken / "meta.json").unlink()
    with pytest.raises(DataError, match="half-written"):
        prepared_dm(broken, cache).corpus
    other = tmp_path / "other_tokenizer.json"
    other.write_text(prepared_dm(corpus_folder, cache, vocab_size=300).tokenizer.to_str())
    with pytest.raises(DataError, match="another tokenizer"):
        prepared_dm(out, cache, tokenizer=str(other)).tokenizer
