"""Small corpora: one file, a few licence texts, files without an extension.

When hashing whole documents leaves the validation split empty, the end of every document is held
out instead (deterministically, never also trained on, and said in a warning); only a corpus too
small for one training batch is refused."""

import pytest

from modlm.data import DataError, DataWarning, ModLMDataModule
from modlm.data.corpus.split import split_tail
from tests.data.helpers import file_corpus
from tests.helpers import REPO

LICENCE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy\n"
    "of this software and associated documentation files, to deal in the Software\n"
    "without restriction, including without limitation the rights to use, copy, modify.\n"
) * 12


def test_split_tail_cuts_at_a_line_and_loses_nothing():
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_tail(text, 0.05)
    assert head + tail == text and tail.startswith("line 9") and head.endswith("\n")
    assert 0.04 * len(text) <= len(tail) <= 0.1 * len(text)
    assert split_tail("x" * 40, 0.25) == ("x" * 30, "x" * 10)  # no line to cut at
    assert split_tail("", 0.5) == ("", "")


def test_the_readme_example_one_markdown_file_trains_and_validates(tmp_path):
    dm = ModLMDataModule(
        source=str(REPO / "README.md"),
        seq_len=64,
        batch_size=4,
        vocab_size=300,
        tokenizer_train_chars=20_000,
        val_windows=4,
        num_workers=0,
        cache_dir=str(tmp_path),
    )
    with pytest.warns(DataWarning, match=r"README.md.*1 document\(s\).*holding out the last"):
        dm.setup("fit")
    val = dm.val_dataloader()
    assert len(val) >= 1 and val.batches[0].shape[1] == 65
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 65)
    corpus = dm.corpus
    (head,), (tail,) = list(corpus.train_texts()), list(corpus.val_texts())
    assert head + tail == (REPO / "README.md").read_text() and len(tail) >= 4 * 65


def test_a_folder_of_licences_without_extensions(tmp_path):
    folder = tmp_path / "licences"
    folder.mkdir()
    for i, name in enumerate(["LICENSE", "COPYING", "NOTICE"]):
        (folder / name).write_text(f"{name} {i}\n" + LICENCE)
    (folder / "logo").write_bytes(b"\x89PNG\r\n\x1a\n\0\0binary")  # not text: skipped
    (folder / ".hidden").write_text("not a document")
    with pytest.warns(DataWarning, match="3 document"):
        corpus = file_corpus(str(folder), val_fraction=0.05, min_val_chars=1000)
    assert sorted(e.relpath for e in corpus.entries) == ["COPYING", "LICENSE", "NOTICE"]
    assert corpus.tail_share == pytest.approx(1000 / sum(e.path.stat().st_size for e in corpus.entries))
    trains, vals = list(corpus.train_texts()), list(corpus.val_texts())
    for e in corpus.entries:
        text = e.path.read_text()
        head, tail = split_tail(text, corpus.tail_share)
        assert head in trains and tail in vals
    assert sum(map(len, vals)) >= 1000 and len(trains) == len(vals) == 3
    single = file_corpus(str(folder / "LICENSE"), val_fraction=0.0)  # a path to one such file works too
    assert [t for _, t in single.part_docs(0, 1, 0)] == [(folder / "LICENSE").read_text()]


def test_only_a_corpus_too_small_for_one_batch_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    dm = ModLMDataModule(
        source=str(tmp_path / "tiny.txt"),
        seq_len=64,
        batch_size=4,
        vocab_size=300,
        val_fraction=0.0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DataError, match=r"too small for one training batch: at most 18 tokens.*4 x 65 = 260"):
        dm.train_dataloader()
