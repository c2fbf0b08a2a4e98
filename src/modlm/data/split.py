"""Deterministic train/validation split, decided per document.

A document's split depends only on a stable key (its path relative to the corpus root,
plus its record number inside multi-record files, or its text for hub streams), never on
the seed, the rank, the worker or the run: changing the seed must not leak validation
documents into training.
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
