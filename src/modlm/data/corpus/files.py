"""Text files as a corpus: ``stdlib`` or a file, folder or glob of them (``FileCorpus``).

Discovery. ``stdlib`` is the running Python's standard library (test folders and site-packages
excluded); otherwise a file, a folder (walked, hidden and cache folders skipped) or a glob of
.txt/.md/.py/.jsonl/.json/.parquet files, or UTF-8 text files without an extension (readers.py),
each plain or compressed (.gz, .zst, .bz2), on the local disk or at an fsspec URL (``s3://``,
``gs://``, ``hf://``, ``file://`` ...: storage.py).

Parts. In epoch `e` the files are visited in an order shuffled with (seed, e) (order.py); the
training documents, in that order, get positions 0, 1, 2, ... . Part `part` of `num_parts` (one
per rank x dataloader worker) owns, in each file, one contiguous block of its training documents,
so it reads only its block's bytes, lines or row groups (readers.py) and never parses another
part's records. A file with n training documents starting at position F is cut into
m = min(n, num_parts) blocks of n // m or n // m + 1 documents (a parquet file with at least
num_parts row groups is cut at row groups instead), and block j goes to part (F + j) % num_parts.
A file of up to num_parts documents (one-document files in particular) thus deals them out as
p % num_parts, and with at least num_parts documents in the corpus every part gets one. The parts
are disjoint, together cover the epoch, and each yields its positions in increasing order.

Split. Whole documents are held out by a hash of their path and record number (split.py); a corpus
too small for that holds out the tail of every document instead.
"""

import bisect
import glob
import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

from ..errors import DataError, DataWarning
from ..order import shuffled
from ..progress import note
from .base import TextCorpus
from .readers import SUPPORTED_SUFFIXES, index_records, is_multi_record, is_supported, read_records, record_name
from .split import is_val, record_key, split_tail
from .storage import COMPRESSIONS, CorpusPath, RemoteFile, compression, filesystem, is_url, local_path

LARGE_CORPUS_FILES = 5_000  # from this many files, or bytes, indexing is announced (it can take a while)
LARGE_CORPUS_BYTES = 1_000_000_000


# Folders never part of the stdlib corpus: test suites (mostly generated or adversarial
# text, and not "library code"), third-party packages, caches.
STDLIB_EXCLUDED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib_test",
    "testing",
    "site-packages",
    "dist-packages",
    "__pycache__",
}
_SKIPPED_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".ipynb_checkpoints"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib root and its .py files (sorted), test folders and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return root, files


def _walk(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if is_supported(Path(dirpath, f))]
    return found


EXPECTED = (
    f"a {'/'.join(sorted(SUPPORTED_SUFFIXES))} file (or UTF-8 text without an extension), plain or "
    f"{'/'.join(COMPRESSIONS)}-compressed, a folder of them, a glob, a URL of one of those, 'stdlib' or 'hub:NAME'"
)


def _discover_url(source: str) -> tuple[RemoteFile, list[RemoteFile]]:
    """(root, sorted files) of a source at an fsspec URL: a file, a folder or a glob."""
    fs, path = filesystem(source)
    try:
        if glob.has_magic(path):
            matches = [RemoteFile(fs, m) for m in sorted(fs.glob(path))]
        else:
            found = RemoteFile(fs, path)
            if not fs.exists(path):
                raise DataError(f"data source {source!r} does not exist (expected {EXPECTED})")
            matches = [found]
        files = []
        for m in matches:
            if m.is_dir():
                for name in sorted(fs.find(m.path)):
                    rel = PurePosixPath(name).relative_to(m.path).parts
                    if not any(part in _SKIPPED_DIRS or part.startswith(".") for part in rel[:-1]):
                        f = RemoteFile(fs, name)
                        files += [f] if is_supported(f) else []
            elif is_supported(m):
                files.append(m)
            elif not glob.has_magic(path):
                raise DataError(f"{source!r}: unsupported file type {m.suffix!r} (expected {EXPECTED})")
    except OSError as e:  # permissions, credentials, network: the storage's own message
        raise DataError(f"data source {source!r}: {e}") from None
    if not files:
        raise DataError(f"data source {source!r} holds no supported files (expected {EXPECTED})")
    files = sorted(set(files))
    if len(matches) == 1 and matches[0].is_dir():
        return matches[0], files
    root = os.path.commonpath([f.parent.path for f in files])
    return RemoteFile(fs, root), files


def discover(source: str) -> tuple[CorpusPath, list[CorpusPath]]:
    """Resolve a source to (root for relative paths, sorted list of files)."""
    if source == "stdlib":
        return stdlib_files()
    if is_url(source):
        local = local_path(source)
        if local is None:
            return _discover_url(source)
        source = str(local)
    expected = EXPECTED
    if glob.has_magic(source):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(source), recursive=True))
        files = []
        for m in matches:
            files += _walk(m) if m.is_dir() else ([m] if is_supported(m) else [])
        if not files:
            raise DataError(f"glob {source!r} matched no supported files (expected {expected})")
        root = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
        return root, sorted(set(f.resolve() for f in files))
    path = Path(source).expanduser()
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"folder {source!r} holds no .txt/.md/.py/.jsonl/.json/.parquet files")
        return path.resolve(), [f.resolve() for f in files]
    if path.is_file():
        if not is_supported(path):
            raise DataError(f"{source!r}: unsupported file type {path.suffix!r} (expected {expected})")
        return path.resolve().parent, [path.resolve()]
    raise DataError(f"data source {source!r} does not exist (expected {expected})")


@dataclass
class FileEntry:
    """One file of the corpus and how its records split into train and val."""

    path: CorpusPath
    relpath: str
    n_records: int
    multi: bool  # several documents per file (jsonl/json/parquet)
    size: int = 0  # bytes of its data (decompressed)
    val_records: list[int] = field(default_factory=list)  # sorted record numbers in val
    marks: Optional[list[int]] = None  # jsonl: byte offsets of every LINE_MARK_EVERY-th line
    groups: Optional[list[int]] = None  # parquet: first row of each row group, then the row count

    @property
    def n_train(self) -> int:
        return self.n_records - len(self.val_records)

    def key(self, record: int) -> str:
        return record_key(self.relpath, record, self.multi)

    def train_rank(self, record: int) -> int:
        """Index of a train record among the file's train records."""
        return record - bisect.bisect_left(self.val_records, record)

    def train_record(self, rank: int) -> int:
        """The record of the train record of index `rank` (n_records for rank == n_train)."""
        record = rank
        for v in self.val_records:  # sorted: each val record at or before the answer moves it on
            if v > record:
                break
            record += 1
        return record

    def block(self, j: int, m: int) -> tuple[int, int]:
        """Train ranks [lo, hi) of block j of m: row groups when there are at least m of them,
        else train records, shared as evenly as they go."""
        if self.groups is not None and len(self.groups) - 1 >= m:
            g = len(self.groups) - 1
            lo, hi = self.groups[j * g // m], self.groups[(j + 1) * g // m]
            return self.train_rank(lo), self.train_rank(hi)
        return j * self.n_train // m, (j + 1) * self.n_train // m


class FileCorpus(TextCorpus):
    """Documents from files, split per document into train and val.

    ``min_val_chars``: when documents' tails are held out (too few documents to hold whole ones
    out), at least this many characters of them in all. ``text_field=None`` reads jsonl/json records
    whole (``readers.py``), and then no document's tail is ever held out (a cut record means nothing)."""

    def __init__(self, source: str, *, text_field: Optional[str], val_fraction: float, seed: int, min_val_chars: int):
        self.source = source
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.seed = seed
        self.root, files = discover(source)
        size = sum(f.stat().st_size for f in files)  # as stored (compressed, for compressed files)
        if size == 0:
            raise DataError(f"data source {source!r} is empty: its {len(files)} file(s) hold no text")
        large = len(files) >= LARGE_CORPUS_FILES or size >= LARGE_CORPUS_BYTES
        if large:  # counting records reads every jsonl/json file: say why the start is slow
            note(f"indexing {len(files):,} files ({size / 1e9:.2f} GB) of {source} ...")
        self.entries = [self._entry(f) for f in files]
        if sum(e.size for e in self.entries) == 0:  # compressed files of nothing
            raise DataError(f"data source {source!r} is empty: its {len(files)} file(s) hold no text")
        if large:
            note(f"indexed {self.describe()}")
        self.num_train_docs = sum(e.n_train for e in self.entries)
        self.num_val_docs = sum(len(e.val_records) for e in self.entries)
        self.tail_share = 0.0  # > 0: validation is the tail of every document instead (small corpora)
        if val_fraction > 0 and (self.num_val_docs == 0 or self.num_train_docs == 0) and text_field is not None:
            self._hold_out_tails(min_val_chars)
        if self.num_train_docs == 0:
            raise DataError(f"data source {source!r}: no documents to train on")

    def _hold_out_tails(self, min_val_chars: int) -> None:
        """Too few documents to hold whole ones out (a single file, a folder of a few licences): every
        document lends the end of its text to validation instead, the same share of each, at least
        ``min_val_chars`` characters in all (so the validation split fills a window), at most half."""
        for e in self.entries:
            e.val_records = []
        self.num_train_docs = sum(e.n_train for e in self.entries)
        self.num_val_docs = self.num_train_docs
        size = sum(e.size for e in self.entries)
        self.tail_share = min(0.5, max(self.val_fraction, min_val_chars / max(size, 1)))
        warnings.warn(
            f"data source {self.source!r}: {self.num_train_docs} document(s), none drawn for validation with "
            f"val_fraction={self.val_fraction}; holding out the last {self.tail_share:.1%} of each document's text "
            "for validation instead (training reads the rest)",
            DataWarning,
        )

    def _entry(self, path: CorpusPath) -> FileEntry:
        rel = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else path.name
        try:
            index = index_records(path, self.text_field)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - each decompressor has its own errors for bad data
            if compression(path) is None:
                raise
            raise DataError(f"{path}: not readable as {compression(path)} ({e})") from None
        n = index.n_records
        entry = FileEntry(
            path, rel, n, is_multi_record(path, index), index.size, marks=index.marks, groups=index.groups
        )
        entry.val_records = [r for r in range(n) if is_val(entry.key(r), self.val_fraction)]
        return entry

    @property
    def source_id(self) -> str:
        """What identifies this corpus in the tokenizer cache key."""
        if self.source == "stdlib":
            return f"stdlib:{sysconfig.get_python_version()}:{self.root}"
        return f"files:{self.root}"

    def fingerprint(self) -> str:
        """Changes when files are added, removed or resized (then the cached tokenizer is stale)."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(f"{e.relpath}\0{e.size}\0{e.n_records}\n".encode("utf-8", "surrogatepass"))
        if self.tail_share:  # the tokenizer learns from the documents' heads only
            h.update(f"tails:{self.tail_share!r}".encode())
        return h.hexdigest()

    @property
    def max_train_tokens(self) -> int:
        """An upper bound of the training tokens (a token is at least one byte; one end-of-text per
        document): too few means not even one batch can be filled."""
        return sum(e.size for e in self.entries) + self.num_train_docs

    def describe(self) -> str:
        return (
            f"{self.source} ({len(self.entries)} files, {self.num_train_docs} train / "
            f"{self.num_val_docs} val documents)"
        )

    # ---- documents of one split, in a fixed order -------------------------------------

    def _split_docs(self, entries: list[FileEntry], want_val: bool) -> Iterator[str]:
        for e in entries:
            if (e.n_train if want_val and self.tail_share else len(e.val_records) if want_val else e.n_train) == 0:
                continue
            val = set(e.val_records)
            for record, text in read_records(e.path, self.text_field, marks=e.marks, size=e.size):
                if self.tail_share:
                    yield split_tail(text, self.tail_share)[1 if want_val else 0]
                elif (record in val) == want_val:
                    yield text

    def every_record(self) -> Iterator[tuple[str, str, bool]]:
        """Every record of every file in path order: where it is (``record_name``: a file's line), its
        text, and whether it is held out for validation."""
        for e in self.entries:
            val = set(e.val_records)
            for record, text in read_records(e.path, self.text_field, marks=e.marks, size=e.size):
                yield record_name(e.path, record), text, record in val

    def train_texts(self) -> Iterator[str]:
        """Training documents for the tokenizer, files in a seed-independent hashed order
        (so a cap on characters samples the whole corpus, not its alphabetical head)."""
        order = sorted(self.entries, key=lambda e: hashlib.sha1(e.relpath.encode("utf-8", "surrogatepass")).digest())
        return self._split_docs(order, want_val=False)

    def val_texts(self) -> Iterator[str]:
        """Validation documents in path order: the same tokens every validation run."""
        return self._split_docs(self.entries, want_val=True)

    # ---- the shuffled training documents, shared out among parts ----------------------

    def epoch_order(self, epoch: int) -> list[FileEntry]:
        """Files holding training documents, in epoch `epoch`'s shuffled order."""
        return shuffled((e for e in self.entries if e.n_train > 0), self.seed, epoch)

    def part_docs(self, part: int, num_parts: int, epoch: int, start: int = 0) -> Iterator[tuple[int, str]]:
        """Yield (position, text) of part `part`'s training documents in epoch `epoch`,
        from position `start` on."""
        first = 0  # position of the current file's first training document
        for e in self.epoch_order(epoch):
            m = min(e.n_train, num_parts)
            j = (part - first) % num_parts  # this part's block of the file, if j < m
            if j < m:
                lo, hi = e.block(j, m)
                lo = max(lo, start - first)
                if lo < hi:
                    val = set(e.val_records)
                    # from the block's first train record through its last, no val record after it
                    for record, text in read_records(
                        e.path, self.text_field, e.train_record(lo), e.train_record(hi - 1) + 1, e.marks, e.size
                    ):
                        if record not in val:
                            pos = first + e.train_rank(record)
                            yield pos, (split_tail(text, self.tail_share)[0] if self.tail_share else text)
            first += e.n_train
