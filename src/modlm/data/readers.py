"""Read documents out of local files, one reader per format.

Every reader yields `(record, text)` pairs, where `record` is the document's number inside
the file (0 for one-document files; the 0-based line for jsonl; the row for json arrays
and parquet). Records that cannot be read are skipped and reported in one DataWarning per
file, so a few bad lines never stop a run.
"""
import json
import warnings
from pathlib import Path
from typing import Iterator

from .errors import DataError, DataWarning

TEXT_SUFFIXES = {".txt", ".md", ".py"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES

_SNIFF_BYTES = 8192  # how much of a file without an extension is read to decide it is text


def is_plain_text(path: Path) -> bool:
    """A file without an extension (LICENSE, COPYING, README) counts as text when its head decodes
    as UTF-8 and holds no NUL byte; hidden files (.gitignore ...) never do."""
    if path.suffix or path.name.startswith("."):
        return False
    import codecs

    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in head


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES or is_plain_text(path)


def _is_text(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES or path.suffix == ""


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


def read_text(path: Path) -> Iterator[tuple[int, str]]:
    """A .txt/.md/.py file (or a text file without an extension) is one document."""
    text, bad = decode_counting(path.read_bytes())
    if bad:
        _warn_replaced(path, bad)
    yield 0, text


def _describe_lines(lines: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" (+{len(lines) - limit} more)" if len(lines) > limit else "")


def read_jsonl(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """One JSON object per line, the document in `text_field`. Blank lines are ignored;
    lines that are not JSON objects or lack a string `text_field` are skipped and counted."""
    not_json: list[int] = []
    no_field: list[int] = []
    replaced = 0
    with open(path, "rb") as f:
        for record, raw in enumerate(f):
            line, bad = decode_counting(raw)
            replaced += bad
            if not line.strip():
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
        parts = []
        if not_json:
            parts.append(f"not JSON at line(s) {_describe_lines(not_json)}")
        if no_field:
            parts.append(f"no string '{text_field}' field at line(s) {_describe_lines(no_field)}")
        warnings.warn(
            f"{path}: skipped {len(not_json) + len(no_field)} line(s): " + "; ".join(parts),
            DataWarning,
            stacklevel=2,
        )


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def read_json(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """A .json file is either a JSON array of objects or, like .jsonl, one object a line."""
    if not _is_json_array(path):
        yield from read_jsonl(path, text_field)
        return
    text, bad = decode_counting(path.read_bytes())
    if bad:
        _warn_replaced(path, bad)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    skipped = []
    for record, obj in enumerate(rows):
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
        meta = pq.read_metadata(path)
    except Exception as e:  # pyarrow raises several types for non-parquet bytes
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in meta.schema.names:
        raise DataError(
            f"{path}: no '{text_field}' column (columns: {', '.join(meta.schema.names)}); "
            f"set --data.text_field"
        )
    return meta.num_rows


def read_parquet(path: Path, text_field: str, batch_size: int = 256) -> Iterator[tuple[int, str]]:
    """Rows of the `text_field` column, streamed through `datasets`' parquet builder.
    Null or non-string cells are skipped and counted."""
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=[str(path)], split="train", streaming=True, columns=[text_field]
    )
    record, skipped = 0, 0
    for batch in ds.iter(batch_size=batch_size):
        for text in batch[text_field]:
            if isinstance(text, str):
                yield record, text
            else:
                skipped += 1
            record += 1
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} row(s) whose '{text_field}' is not a string",
            DataWarning,
            stacklevel=2,
        )


def count_records(path: Path, text_field: str) -> int:
    """How many records (candidate documents) a file holds, without tokenizing anything."""
    suffix = path.suffix.lower()
    if _is_text(path):
        return 1
    if suffix in PARQUET_SUFFIXES:
        return parquet_rows(path, text_field)
    if suffix == ".json" and _is_json_array(path):
        return _json_array_len(path)
    with open(path, "rb") as f:  # jsonl: one record per line
        return sum(1 for _ in f)


def _json_array_len(path: Path) -> int:
    text, _ = decode_counting(path.read_bytes())
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line")
    return len(rows)


def read_records(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """Dispatch on the file suffix."""
    suffix = path.suffix.lower()
    if _is_text(path):
        return read_text(path)
    if suffix == ".jsonl":
        return read_jsonl(path, text_field)
    if suffix == ".json":
        return read_json(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(path, text_field)
    raise DataError(f"{path}: unsupported file type (expected {', '.join(sorted(SUPPORTED_SUFFIXES))})")


def is_multi_record(path: Path) -> bool:
    return not _is_text(path)


__all__ = [
    "SUPPORTED_SUFFIXES",
    "count_records",
    "decode_counting",
    "is_multi_record",
    "is_supported",
    "read_records",
]
