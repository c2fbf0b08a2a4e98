"""Corpora as people store them: compressed files (.gz, .zst, .bz2) of every format, and files at
fsspec URLs (fsspec's in-memory filesystem and file:// stand in for s3://, gs://, hf://), read as
the same documents, parts and resumed parts as the plain local files."""

import bz2
import gzip
import importlib.util
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modlm.data import DataError
from modlm.data.corpus import readers
from tests.data.helpers import STDLIB, file_corpus

NAMES = ["bisect.py", "colorsys.py", "keyword.py", "this.py", "stat.py", "token.py", "heapq.py", "shlex.py"]


def zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


COMPRESS = {".gz": lambda data: gzip.compress(data, mtime=0), ".bz2": bz2.compress, ".zst": zstd}


@pytest.fixture
def small_pieces(monkeypatch):
    """Text pieces of 3 kB and a jsonl line mark every 7 lines, so that small files exercise both."""
    monkeypatch.setattr(readers, "TEXT_PIECE_BYTES", 3000)
    monkeypatch.setattr(readers, "LINE_MARK_EVERY", 7)


def write_corpus(folder: Path) -> dict[str, bytes]:
    """One file of each format: a text file in pieces, a .md, a file without an extension, jsonl,
    a JSON array and a parquet file of several row groups; returns {relative name: bytes}."""
    texts = [(STDLIB / name).read_text() for name in NAMES]
    folder.mkdir()
    (folder / "big.txt").write_text("".join(texts[:3]))
    (folder / "notes.md").write_text("# notes\n\n" + texts[3])
    (folder / "LICENSE").write_text(texts[4])
    lines = [json.dumps({"text": line}) for t in texts[5:] for line in t.split("\n\n")]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "array.json").write_text(json.dumps([{"text": t} for t in lines[:25]]))
    pq.write_table(
        pa.table({"text": [json.loads(line)["text"] for line in lines[:40]]}),
        folder / "sub" / "rows.parquet",
        row_group_size=9,
    )
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def everything(corpus, parts=(1, 3, 5)) -> dict:
    """What a corpus reads: its counts, both splits, every part's documents, and a part resumed."""
    got = {
        "docs": (corpus.num_train_docs, corpus.num_val_docs),
        "bound": corpus.max_train_tokens,
        "train": list(corpus.train_texts()),
        "val": list(corpus.val_texts()),
    }
    for n in parts:
        for part in range(n):
            got[n, part] = list(corpus.part_docs(part, n, epoch=1))
            got[n, part, "resumed"] = list(
                corpus.part_docs(part, n, epoch=1, start=got[n, part][len(got[n, part]) // 2][0])
            )
    return got


def read_at(source: str):
    return file_corpus(source, val_fraction=0.25)


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_compressed_files_of_every_format_read_as_the_plain_ones(tmp_path, small_pieces, suffix):
    files = write_corpus(tmp_path / "plain")
    plain = read_at(str(tmp_path / "plain"))
    assert [e.n_records for e in plain.entries if e.relpath == "big.txt"] == [-(-len(files["big.txt"]) // 3000)]
    pieces = [text for _, text in readers.read_records(tmp_path / "plain" / "big.txt", "text")]
    assert len(pieces) == 3 and "".join(pieces) == files["big.txt"].decode()  # whole lines, all of them
    packed = tmp_path / "packed"
    for name, data in files.items():
        (packed / (name + suffix)).parent.mkdir(parents=True, exist_ok=True)
        (packed / (name + suffix)).write_bytes(COMPRESS[suffix](data))
    corpus = read_at(str(packed))
    assert [e.relpath for e in corpus.entries] == [e.relpath + suffix for e in plain.entries]
    assert [(e.n_records, e.size) for e in corpus.entries] == [(e.n_records, e.size) for e in plain.entries]
    # the split hashes relative paths: give the compressed files the plain ones' split to compare reading alone
    for e, p in zip(corpus.entries, plain.entries):
        e.relpath, e.val_records = p.relpath, p.val_records
    corpus.num_train_docs, corpus.num_val_docs = plain.num_train_docs, plain.num_val_docs
    assert everything(corpus) == everything(plain)


def test_a_compressed_file_alone_and_bad_compressed_data(tmp_path):
    text = (STDLIB / "heapq.py").read_bytes()
    (tmp_path / "one.txt.gz").write_bytes(gzip.compress(text))
    corpus = file_corpus(str(tmp_path / "one.txt.gz"), val_fraction=0.0)
    assert [t for _, t in corpus.part_docs(0, 1, epoch=0)] == [text.decode()]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: not readable as gzip \(Not a gzipped file"):
        file_corpus(str(tmp_path / "bad.jsonl.gz"))
    (tmp_path / "odd.csv.gz").write_bytes(gzip.compress(b"a,b\n"))
    with pytest.raises(DataError, match=r"unsupported file type '\.gz'.*\.gz/\.zst/\.bz2-compressed"):
        file_corpus(str(tmp_path / "odd.csv.gz"))


def test_files_at_fsspec_urls_read_as_local_files(tmp_path, small_pieces):
    files = write_corpus(tmp_path / "plain")
    plain = read_at(str(tmp_path / "plain"))
    memory = fsspec.filesystem("memory")
    try:
        for name, data in files.items():
            memory.pipe(f"/corpus/{name}", data)
        memory.pipe("/corpus/.hidden/skipped.txt", b"never read")
        memory.pipe("/corpus/logo.png", b"\x89PNG\0\0")
        for source in ("memory://corpus", f"file://{tmp_path / 'plain'}"):
            corpus = read_at(source)
            assert [e.relpath for e in corpus.entries] == [e.relpath for e in plain.entries], source
            assert everything(corpus) == everything(plain), source
        assert corpus.source_id == plain.source_id  # file:// is the local folder itself
        assert read_at("memory://corpus").source_id == "files:memory:///corpus"

        # a glob and a single compressed file at a URL
        memory.pipe("/other/a.jsonl.gz", gzip.compress(files["docs.jsonl"]))
        globbed = read_at("memory://other/*.jsonl*")
        assert [e.relpath for e in globbed.entries] == ["a.jsonl.gz"]
        assert list(globbed.train_texts()) + list(globbed.val_texts()) and globbed.entries[0].size == len(
            files["docs.jsonl"]
        )
    finally:  # the in-memory filesystem lives as long as the process
        for folder in ("/corpus", "/other"):
            if memory.exists(folder):
                memory.rm(folder, recursive=True)

    with pytest.raises(DataError, match=r"'memory://nowhere' does not exist"):
        file_corpus("memory://nowhere")
    with pytest.raises(DataError, match=r"nosuchfs://x/y.*Protocol not known"):
        file_corpus("nosuchfs://x/y")
    if importlib.util.find_spec("s3fs") is None:  # a missing backend names the package to install
        with pytest.raises(DataError, match=r"s3fs"):
            file_corpus("s3://bucket/corpus")


def test_a_missing_decompressor_is_named(tmp_path, monkeypatch):
    import sys

    (tmp_path / "a.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd not really zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"\.zst files needs the zstandard package"):
        file_corpus(str(tmp_path / "a.txt.zst"))
