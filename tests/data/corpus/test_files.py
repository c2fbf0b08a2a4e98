"""Corpus discovery, each source kind, the train/val split and bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modlm.data import DataError, DataWarning
from modlm.data.corpus.files import stdlib_files
from modlm.data.corpus.split import is_val
from tests.data.helpers import copy_stdlib, file_corpus, open_source

SMALL = [
    "abc.py",
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "keyword.py",
    "numbers.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "string.py",
    "this.py",
]


def all_docs(corpus) -> list:
    return list(corpus.part_docs(0, 1, epoch=0))


def test_stdlib_discovery_excludes_tests_and_site_packages():
    root, files = stdlib_files()
    rel = [f.relative_to(root).parts for f in files]
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(parts) for parts in rel)
    assert ("json", "decoder.py") in [p[-2:] for p in rel]
    corpus = open_source("stdlib")
    assert corpus.num_train_docs > 300 and corpus.num_val_docs > 0


def test_text_folder_one_doc_per_file(tmp_path):
    folder = copy_stdlib(tmp_path / "c", SMALL)
    (folder / "notes.md").write_text("# Héllo\n\nwörld ✓\n", encoding="utf-8")
    (folder / "plain.txt").write_text("just text\n")
    corpus = file_corpus(str(folder), val_fraction=0.2)
    assert len(corpus.entries) == len(SMALL) + 2
    assert corpus.num_train_docs + corpus.num_val_docs == len(SMALL) + 2
    texts = {t for _, t in all_docs(corpus)} | set(corpus.val_texts())
    assert "# Héllo\n\nwörld ✓\n" in texts and "just text\n" in texts


def test_single_file_and_glob(tmp_path):
    folder = copy_stdlib(tmp_path / "c", SMALL)
    one = file_corpus(str(folder / "copy.py"), val_fraction=0.0)
    assert [t for _, t in all_docs(one)] == [(folder / "copy.py").read_text()]
    globbed = file_corpus(str(tmp_path / "c" / "[a-h]*.py"), val_fraction=0.0)
    assert sorted(e.relpath for e in globbed.entries) == sorted(n for n in SMALL if n[0] <= "h")


def test_split_is_deterministic_disjoint_and_seed_independent(tmp_path):
    folder = copy_stdlib(tmp_path / "c", SMALL)
    a = file_corpus(str(folder), val_fraction=0.3, seed=1)
    b = file_corpus(str(folder), val_fraction=0.3, seed=2)
    train_a = {t for _, t in all_docs(a)}
    val_a = set(a.val_texts())
    assert train_a and val_a and not (train_a & val_a)
    assert train_a | val_a == {(folder / n).read_text() for n in SMALL}
    assert val_a == set(b.val_texts()) and train_a == {t for _, t in all_docs(b)}
    assert [e.relpath for e in a.entries if e.val_records] == [n for n in sorted(SMALL) if is_val(n, 0.3)]


def test_jsonl_bad_lines_are_skipped_and_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"doc {i} ü"}) for i in range(20)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"body": "no text field"})
    lines[9] = ""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = file_corpus(str(path), val_fraction=0.0)
    with pytest.warns(
        DataWarning,
        match=r"d\.jsonl: skipped 2 line\(s\): not JSON at line\(s\) 4; "
        r"no string 'text' field at line\(s\) 8",
    ):
        docs = all_docs(corpus)
    assert [t for _, t in docs] == [f"doc {i} ü" for i in range(20) if i not in (3, 7, 9)]


def test_text_field_json_array_and_parquet(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"body": f"jsonl {i}"}) for i in range(10)))
    (folder / "b.json").write_text(json.dumps([{"body": f"json {i}"} for i in range(10)]))
    pq.write_table(
        pa.table({"body": [f"parquet {i}" for i in range(10)] + [None], "n": list(range(11))}), folder / "c.parquet"
    )
    (folder / "d.txt").write_text("a text file")
    corpus = file_corpus(str(folder), text_field="body", val_fraction=0.2)
    with pytest.warns(DataWarning, match=r"c\.parquet: skipped 1 row"):
        texts = sorted([t for _, t in all_docs(corpus)] + list(corpus.val_texts()))
    expected = sorted([f"{k} {i}" for k in ("jsonl", "json", "parquet") for i in range(10)] + ["a text file"])
    assert texts == expected
    assert corpus.num_val_docs > 0 and corpus.num_train_docs > 0


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    folder = copy_stdlib(tmp_path / "c", SMALL[:4])
    (folder / "bad.txt").write_bytes(b"ok \xff\xfe then \xc3 and valid \xef\xbf\xbd end")
    corpus = file_corpus(str(folder), val_fraction=0.0)
    with pytest.warns(DataWarning, match=r"bad\.txt: 3 undecodable byte sequence"):
        texts = [t for _, t in all_docs(corpus)]
    assert "ok \ufffd\ufffd then \ufffd and valid \ufffd end" in texts


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/nope", "does not exist"),
        ("{tmp}/*.nothing", "matched no supported files"),
        ("{tmp}/emptydir", "holds no .txt"),
        ("{tmp}/blank", "is empty"),
        ("{tmp}/data.csv", "unsupported file type"),
        ("", "expected a path"),
    ],
)
def test_bad_sources_raise_data_error(tmp_path, source, message):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "x.csv").write_text("a,b")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=message):
        open_source(source.format(tmp=tmp_path))


def test_splits_too_small_for_whole_documents_hold_out_document_tails(tmp_path):
    folder = copy_stdlib(tmp_path / "c", ["copy.py"])
    text = (folder / "copy.py").read_text()
    for val_fraction in (0.05, 0.999999):  # one document: none drawn for val / all drawn for val
        with pytest.warns(DataWarning, match="holding out the last"):
            corpus = file_corpus(str(folder), val_fraction=val_fraction)
        assert corpus.num_train_docs == corpus.num_val_docs == 1
        (head,), (tail,) = list(corpus.train_texts()), list(corpus.val_texts())
        assert head + tail == text and head and tail  # no overlap, nothing lost
        assert [t for _, t in all_docs(corpus)] == [head]
    assert not file_corpus(str(folder), val_fraction=0.0).tail_share  # no validation asked: all of it trains


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: no 'text' column"):
        open_source(str(tmp_path / "c.parquet"))
