"""Read documents out of local files, one reader per format.

Every reader yields `(record, text)` pairs, where `record` is the document's number inside
the file (0 for one-document files; the 0-based line for jsonl; the row for json arrays
and parquet; the piece for a text file larger than `TEXT_PIECE_BYTES`). Records that cannot be
read are skipped and reported in one DataWarning per file, so a few bad lines never stop a run.

Records. With ``text_field=None`` a jsonl or json file's records are read whole, as their JSON text
(a jsonl line as it is, blank lines aside; a JSON array's item written back as JSON), nothing checked
or skipped: for a reader of structured records (conversations, ``corpus/chat.py``), which refuses a bad
one itself, naming its line.

Ranges. Every reader takes a record range [lo, hi) and reads only what that range needs, so the
loader's parts, each owning a range of a file, never parse each other's records: jsonl seeks to
the nearest line mark noted while the file was indexed (one every `LINE_MARK_EVERY` lines) and
skips the few lines before `lo` without decoding them; parquet reads only the row groups that
overlap the range (`ParquetFile.read_row_group`); a large text file reads only its pieces' bytes.
A JSON array can only be parsed whole, so each part owning a range of one parses all of it (use
jsonl or parquet for large corpora).

Pieces. A text file larger than `TEXT_PIECE_BYTES` is several documents, so that one big file can
be shared by many parts: piece k holds the lines that start in bytes [k * P, (k + 1) * P) (P the
piece size), so a line is never cut, and a piece is empty when a single line covers its bytes.
The pieces depend only on the file, never on the number of parts.

Storage. Every reader takes a local ``Path`` or a file at an fsspec URL, plain or compressed
(``.gz``, ``.zst``, ``.bz2``: the suffix before it says the format), and reads it through
``storage.open_bytes``. In a decompressing stream nothing seeks: a reader reads up to the byte it
would seek to, and a text file's pieces count its decompressed bytes; a compressed parquet file is
decompressed into memory (parquet is read by seeking), so it is best left uncompressed (its pages
are compressed already).
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import DataError, DataWarning
from .storage import CorpusPath, can_seek, data_size, format_suffix, open_bytes, read_all, seekable_copy, skip

TEXT_SUFFIXES = {".txt", ".md", ".py"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES

TEXT_PIECE_BYTES = 4 << 20  # a text file larger than this is read as pieces of about this size
LINE_MARK_EVERY = 1024  # jsonl lines between two byte offsets noted while indexing

_SNIFF_BYTES = 8192  # how much of a file without an extension is read to decide it is text


def is_plain_text(path: CorpusPath) -> bool:
    """A file without an extension (LICENSE, COPYING, README; or LICENSE.gz) counts as text when its
    head decodes as UTF-8 and holds no NUL byte; hidden files (.gitignore ...) never do."""
    if format_suffix(path) or path.name.startswith("."):
        return False
    import codecs

    try:
        with open_bytes(path) as f:
            head = f.read(_SNIFF_BYTES)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except (OSError, EOFError, UnicodeDecodeError, DataError):  # EOFError: a cut compressed stream
        return False
    return b"\0" not in head


def is_supported(path: CorpusPath) -> bool:
    return format_suffix(path) in SUPPORTED_SUFFIXES or is_plain_text(path)


def _is_text(path: CorpusPath) -> bool:
    return format_suffix(path) in TEXT_SUFFIXES or format_suffix(path) == ""


_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode("utf-8")


def decode_counting(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with U+FFFD for bad bytes; returns (text, number of replacements).

    Counting = replacement characters in the output minus those already present, validly
    encoded, in the input (a file may legitimately contain U+FFFD)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)


def _warn_replaced(path: Path, count: int, where: str = "") -> None:
    warnings.warn(
        f"{path}{where}: {count} undecodable byte sequence(s) replaced with U+FFFD",
        DataWarning,
        stacklevel=3,
    )


def text_pieces(size: int) -> int:
    """How many documents a text file of `size` (decompressed) bytes is: 1, or its pieces when it
    is larger than TEXT_PIECE_BYTES."""
    return 1 if size <= TEXT_PIECE_BYTES else -(-size // TEXT_PIECE_BYTES)


def _go_to(f, path: CorpusPath, offset: int) -> None:
    """Move a freshly opened file to `offset`: a seek, or reading up to it in a decompressing stream."""
    if can_seek(path):
        f.seek(offset)
    else:
        skip(f, offset)


def read_text(
    path: CorpusPath, lo: int = 0, hi: Optional[int] = None, size: Optional[int] = None
) -> Iterator[tuple[int, str]]:
    """A .txt/.md/.py file (or a text file without an extension) is one document, or one per piece
    when large; only the pieces in [lo, hi) are read. `size`: the file's decompressed bytes, where
    the caller knows them (else read again)."""
    n = text_pieces(data_size(path) if size is None else size)
    hi = n if hi is None else min(hi, n)
    if n == 1:
        if lo <= 0 < hi:
            text, bad = decode_counting(read_all(path))
            if bad:
                _warn_replaced(path, bad)
            yield 0, text
        return
    replaced = 0
    with open_bytes(path) as f:
        # Forward only, so that a decompressing stream reads the file once: `pos` is where the next
        # piece's first line starts, the first line that starts at or after the piece's first byte.
        start = lo * TEXT_PIECE_BYTES
        pos = 0
        if start > 0:
            _go_to(f, path, start - 1)
            pos = start - 1 + len(f.readline())  # through the line holding the byte before the piece
        for piece in range(lo, hi):
            end = (piece + 1) * TEXT_PIECE_BYTES  # the piece's lines start before this byte
            if pos >= end:
                continue  # one line covers the whole piece: it belongs to an earlier one
            raw = f.read(end - 1 - pos) + f.readline()  # through the line holding the piece's last byte
            pos += len(raw)
            if raw:
                text, bad = decode_counting(raw)
                replaced += bad
                yield piece, text
    if replaced:
        _warn_replaced(path, replaced)


def _describe_lines(lines: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" (+{len(lines) - limit} more)" if len(lines) > limit else "")


def line_marks(path: CorpusPath) -> tuple[int, list[int], int]:
    """(number of lines, byte offset of every LINE_MARK_EVERY-th line, bytes): what lets a reader
    seek near any line without reading the lines before it."""
    marks, offset, n = [], 0, 0
    with open_bytes(path) as f:
        for n, raw in enumerate(f, 1):
            if (n - 1) % LINE_MARK_EVERY == 0:
                marks.append(offset)
            offset += len(raw)
    return n, marks, offset


def _raw_lines(path: CorpusPath, lo: int, hi: Optional[int], marks: Optional[list[int]]) -> Iterator[tuple[int, bytes]]:
    """(line number, undecoded bytes) of lines [lo, hi); the lines between the nearest mark and
    `lo` are skipped without being decoded."""
    with open_bytes(path) as f:
        record = 0
        if marks and lo > 0:
            k = min(lo // LINE_MARK_EVERY, len(marks) - 1)
            _go_to(f, path, marks[k])
            record = k * LINE_MARK_EVERY
        while record < lo:
            if not f.readline():
                return
            record += 1
        while hi is None or record < hi:
            raw = f.readline()
            if not raw:
                return
            yield record, raw
            record += 1


def read_jsonl(
    path: Path, text_field: Optional[str], lo: int = 0, hi: Optional[int] = None, marks: Optional[list[int]] = None
) -> Iterator[tuple[int, str]]:
    """One JSON object per line, the document in `text_field`. Blank lines are ignored;
    lines that are not JSON objects or lack a string `text_field` are skipped and counted
    (``text_field=None``: every line, unread, as its record). Only lines [lo, hi) are decoded;
    `marks` (from `line_marks`) saves reading the lines before."""
    not_json: list[int] = []
    no_field: list[int] = []
    replaced = 0
    for record, raw in _raw_lines(path, lo, hi, marks):
        line, bad = decode_counting(raw)
        replaced += bad
        if not line.strip():
            continue
        if text_field is None:
            yield record, line
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            not_json.append(record + 1)
            continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            no_field.append(record + 1)
            continue
        yield record, text
    if replaced:
        _warn_replaced(path, replaced)
    if not_json or no_field:
        reasons = []
        if not_json:
            reasons.append(f"not JSON at line(s) {_describe_lines(not_json)}")
        if no_field:
            reasons.append(f"no string '{text_field}' field at line(s) {_describe_lines(no_field)}")
        warnings.warn(
            f"{path}: skipped {len(not_json) + len(no_field)} line(s): " + "; ".join(reasons),
            DataWarning,
            stacklevel=2,
        )


def _is_json_array(path: CorpusPath) -> bool:
    with open_bytes(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def read_json(
    path: Path, text_field: Optional[str], lo: int = 0, hi: Optional[int] = None, marks: Optional[list[int]] = None
) -> Iterator[tuple[int, str]]:
    """A .json file is either a JSON array of objects (parsed whole, items [lo, hi) kept) or,
    like .jsonl, one object a line (``text_field=None``: each item as its JSON text)."""
    if not _is_json_array(path):
        yield from read_jsonl(path, text_field, lo, hi, marks)
        return
    text, bad = decode_counting(read_all(path))
    if bad:
        _warn_replaced(path, bad)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    skipped = []
    for record, obj in enumerate(rows):
        if record < lo or (hi is not None and record >= hi):
            continue
        if text_field is None:
            yield record, json.dumps(obj)
            continue
        value = obj.get(text_field) if isinstance(obj, dict) else None
        if isinstance(value, str):
            yield record, value
        else:
            skipped.append(record)
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} array item(s) without a string '{text_field}' "
            f"field (items {_describe_lines(skipped)})",
            DataWarning,
            stacklevel=2,
        )


def parquet_rows(path: Path, text_field: str) -> int:
    """Number of rows of a parquet file (from its footer), checking the text column exists."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(seekable_copy(path))
    except Exception as e:  # pyarrow raises several types for non-parquet bytes
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in meta.schema.names:
        raise DataError(
            f"{path}: no '{text_field}' column (columns: {', '.join(meta.schema.names)}); set --data.text_field"
        )
    return meta.num_rows


def parquet_groups(path: Path) -> list[int]:
    """Row numbers where the file's row groups start, then its row count: [0, ..., rows]."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(seekable_copy(path))
    bounds = [0]
    for g in range(meta.num_row_groups):
        bounds.append(bounds[-1] + meta.row_group(g).num_rows)
    return bounds


def read_parquet(path: Path, text_field: str, lo: int = 0, hi: Optional[int] = None) -> Iterator[tuple[int, str]]:
    """Rows [lo, hi) of the `text_field` column, reading only the row groups that hold them.
    Null or non-string cells are skipped and counted."""
    import pyarrow.parquet as pq

    skipped = 0
    with pq.ParquetFile(seekable_copy(path)) as pf:
        start = 0
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            end, first = start + rows, start
            start = end
            if end <= lo or (hi is not None and first >= hi):
                continue
            column = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
            for record in range(max(first, lo), end if hi is None else min(end, hi)):
                text = column[record - first]
                if isinstance(text, str):
                    yield record, text
                else:
                    skipped += 1
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} row(s) whose '{text_field}' is not a string",
            DataWarning,
            stacklevel=2,
        )


@dataclass
class RecordIndex:
    """What indexing a file found: its record count, and what lets a reader go straight to a record."""

    n_records: int
    size: int  # bytes of the file's data (decompressed)
    marks: Optional[list[int]] = None  # jsonl: byte offsets of every LINE_MARK_EVERY-th line
    groups: Optional[list[int]] = None  # parquet: first row of each row group, then the row count


def index_records(path: CorpusPath, text_field: str) -> RecordIndex:
    """Count a file's records (candidate documents) without tokenizing anything, noting where
    its lines or row groups start, and how many bytes its data is."""
    suffix = format_suffix(path)
    if _is_text(path):
        size = data_size(path)
        return RecordIndex(text_pieces(size), size)
    if suffix in PARQUET_SUFFIXES:
        return RecordIndex(parquet_rows(path, text_field), data_size(path), groups=parquet_groups(path))
    if suffix == ".json" and _is_json_array(path):
        return RecordIndex(*_json_array_len(path))
    n, marks, size = line_marks(path)  # jsonl: one record per line
    return RecordIndex(n, size, marks=marks)


def _json_array_len(path: CorpusPath) -> tuple[int, int]:
    """(items, bytes) of a JSON array file."""
    raw = read_all(path)
    text, _ = decode_counting(raw)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line")
    return len(rows), len(raw)


def read_records(
    path: CorpusPath,
    text_field: Optional[str],
    lo: int = 0,
    hi: Optional[int] = None,
    marks: Optional[list[int]] = None,
    size: Optional[int] = None,
) -> Iterator[tuple[int, str]]:
    """Records [lo, hi) of a file (all by default), dispatched on its format suffix; `marks` are a
    jsonl file's line marks and `size` its decompressed bytes, from `index_records`; ``text_field=None``:
    a jsonl or json file's records whole, as JSON text."""
    suffix = format_suffix(path)
    if _is_text(path):
        return read_text(path, lo, hi, size)
    if suffix == ".jsonl":
        return read_jsonl(path, text_field, lo, hi, marks)
    if suffix == ".json":
        return read_json(path, text_field, lo, hi, marks)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(path, text_field, lo, hi)
    raise DataError(f"{path}: unsupported file type (expected {', '.join(sorted(SUPPORTED_SUFFIXES))})")


def record_name(path: CorpusPath, record: int) -> str:
    """How a user finds record ``record`` of a file: its line (jsonl; a json file of one object a line), its
    item (a JSON array), its row (parquet) or piece (a large text file)."""
    suffix = format_suffix(path)
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_array(path)):
        return f"{path} line {record + 1}"
    return f"{path} {'item' if suffix == '.json' else 'row' if suffix in PARQUET_SUFFIXES else 'piece'} {record + 1}"


def is_multi_record(path: CorpusPath, index: RecordIndex) -> bool:
    """Whether the file holds several documents (jsonl/json/parquet, or a text file in pieces)."""
    return not _is_text(path) or index.n_records > 1


__all__ = [
    "SUPPORTED_SUFFIXES",
    "decode_counting",
    "index_records",
    "is_multi_record",
    "is_supported",
    "read_records",
    "record_name",
]
