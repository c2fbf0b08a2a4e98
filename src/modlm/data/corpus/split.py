"""The train/validation split of text documents: hashed per document, or document tails held out.

Split. A document's train/validation split depends only on a stable key (its path relative to
the corpus root, plus its record number inside multi-record files, or its text for hub streams),
never on the seed, the rank, the worker or the run: changing the seed must not leak validation
documents into training.

Tails. A corpus with too few documents to hold whole ones out (one file, a folder of a few
licences) holds out the end of every document instead: ``split_tail`` cuts a document into the head
that trains and the tail that validates, deterministically and with no character in both.
"""

import hashlib


def unit_hash(key: str) -> float:
    """Map a key to a float in [0, 1), uniformly and identically on every machine."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_val(key: str, val_fraction: float) -> bool:
    """True if the document with this key belongs to the validation split."""
    return unit_hash(key) < val_fraction


def record_key(relpath: str, record: int, multi_record: bool) -> str:
    """The split key of record `record` of a file: the path alone for one-document files."""
    return f"{relpath}#{record}" if multi_record else relpath


def split_tail(text: str, share: float) -> tuple[str, str]:
    """(head, tail) of a document, the tail about ``share`` of its characters, starting at a line
    when one starts near the cut (within another ``share``): deterministic, and no character in both."""
    if not text:
        return "", ""
    cut = len(text) - max(1, round(len(text) * share))
    line = text.rfind("\n", 0, cut) + 1
    if line > 0 and cut - line <= len(text) * share:
        cut = line
    return text[:cut], text[cut:]
