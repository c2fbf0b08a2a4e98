"""Each part (one per rank x dataloader worker) reads only its share of a file, and the shares cover
the corpus exactly once."""

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modlm.data.corpus import readers
from tests.data.helpers import file_corpus


def all_parts(corpus, num_parts, epoch=0):
    return [list(corpus.part_docs(p, num_parts, epoch)) for p in range(num_parts)]


def assert_exact_cover(corpus, expected_texts, empty_positions=0):
    """Every part count covers the documents once; `empty_positions` records yield no text."""
    for num_parts in (1, 2, 3, 4):
        shares = all_parts(corpus, num_parts)
        positions = sorted(p for share in shares for p, _ in share)
        assert len(set(positions)) == len(positions) == corpus.num_train_docs - empty_positions
        assert set(positions) <= set(range(corpus.num_train_docs))
        assert sorted(t for share in shares for _, t in share) == sorted(expected_texts)
        assert all([p for p, _ in share] == sorted(p for p, _ in share) for share in shares)
        assert all(share for share in shares)


def test_jsonl_parts_cover_every_document_once(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "LINE_MARK_EVERY", 4)  # several marks in a small file
    texts = [f"doc {i}" for i in range(37)]
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    corpus = file_corpus(str(tmp_path / "d.jsonl"), val_fraction=0.2, seed=3)
    assert corpus.entries[0].marks == [len("".join(lines[:k])) for k in range(0, 37, 4)]
    train = [t for i, t in enumerate(texts) if i not in corpus.entries[0].val_records]
    assert 0 < len(train) < len(texts)
    assert_exact_cover(corpus, train)
    # A resume mid-share yields that share's tail exactly.
    share = list(corpus.part_docs(2, 3, 0))
    assert list(corpus.part_docs(2, 3, 0, start=share[2][0])) == share[2:]


def test_jsonl_part_never_parses_another_parts_lines(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(40)]
    lines[35] = "{broken"  # inside the last part's block
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    corpus = file_corpus(str(tmp_path / "d.jsonl"), val_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning about line 36 would fail this part
        first = list(corpus.part_docs(0, 4, 0))
    assert [t for _, t in first] == [f"doc {i}" for i in range(10)]
    with pytest.warns(UserWarning, match=r"not JSON at line\(s\) 36"):
        last = list(corpus.part_docs(3, 4, 0))
    assert [t for _, t in last] == [f"doc {i}" for i in range(30, 40) if i != 35]


def test_parquet_parts_read_only_their_row_groups(tmp_path, monkeypatch):
    texts = [f"row {i}" for i in range(64)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=8)
    corpus = file_corpus(str(tmp_path / "d.parquet"), val_fraction=0.1, seed=5)
    assert corpus.entries[0].groups == list(range(0, 65, 8))
    train = [t for i, t in enumerate(texts) if i not in corpus.entries[0].val_records]
    assert_exact_cover(corpus, train)
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or real(self, i, **kw))
    for part in range(4):
        read.clear()
        list(corpus.part_docs(part, 4, 0))
        assert read == [2 * part, 2 * part + 1]  # 8 groups, 4 parts: two groups each, nothing else


def test_big_text_file_is_shared_by_line_aligned_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "TEXT_PIECE_BYTES", 100)
    lines = [f"line {i} " + "x" * (i % 23) + "\n" for i in range(120)]
    lines[40] = "y" * 250 + "\n"  # longer than a piece: the pieces it covers are empty
    text = "".join(lines)
    (tmp_path / "big.txt").write_text(text)
    corpus = file_corpus(str(tmp_path / "big.txt"), val_fraction=0.0)
    e = corpus.entries[0]
    assert e.multi and e.n_records == -(-len(text) // 100)
    pieces = [t for _, t in corpus.part_docs(0, 1, 0)]
    assert "".join(pieces) == text  # nothing lost, nothing twice, in order
    assert all(p.endswith("\n") for p in pieces)  # never a cut line
    assert len(pieces) < e.n_records  # the long line left some pieces empty
    assert_exact_cover(corpus, pieces, empty_positions=e.n_records - len(pieces))
    # A part's pieces are contiguous whole lines of the file.
    for share in all_parts(corpus, 3):
        assert "".join(t for _, t in share) in text
