"""Where corpus files are kept and how: local paths or fsspec URLs, plain or compressed.

Places. A ``--data.source`` with a URL scheme (``s3://``, ``gs://``, ``hf://``, ``memory://`` ...)
is opened with fsspec (``s3://`` and ``gs://`` need their backends, ``s3fs`` and ``gcsfs``;
``hf://`` is huggingface_hub's); ``file://`` is a local path. A file at a URL is a ``RemoteFile``,
which offers the few ``pathlib.Path`` methods the corpus uses, so the readers take either.

Compression. ``.gz``, ``.zst`` and ``.bz2`` files (``corpus.jsonl.gz``, ``notes.txt.zst``) are
streamed through their decompressor, never written out decompressed; the suffix before the
compression one decides the format. A decompressing stream only goes forward: a reader that would
seek reads up to the byte instead (``skip``), so each part of the loader reads such a file from its
start to its own records (the records, and so the exact resume, are the same as uncompressed).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional, Union
from urllib.parse import unquote, urlparse

from ..errors import DataError

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
"""Compressed file suffixes and what decompresses them."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SKIP_CHUNK = 1 << 20


def is_url(source: str) -> bool:
    return bool(_URL.match(source))


def local_path(source: str) -> Optional[Path]:
    """The local path a ``file://`` URL names (None for any other URL)."""
    url = urlparse(source)
    return Path(unquote(url.netloc + url.path)) if url.scheme == "file" else None


class RemoteFile:
    """A file or folder at an fsspec URL, with the part of ``pathlib.Path`` the corpus uses."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path.rstrip("/") or "/"

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def parent(self) -> "RemoteFile":
        return RemoteFile(self.fs, str(PurePosixPath(self.path).parent))

    def stat(self) -> os.stat_result:
        return os.stat_result((0, 0, 0, 0, 0, 0, int(self.fs.size(self.path)), 0, 0, 0))

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def resolve(self) -> "RemoteFile":
        return self

    def is_relative_to(self, root: "RemoteFile") -> bool:
        return isinstance(root, RemoteFile) and PurePosixPath(self.path).is_relative_to(root.path)

    def relative_to(self, root: "RemoteFile") -> PurePosixPath:
        return PurePosixPath(self.path).relative_to(root.path)

    def open_raw(self) -> BinaryIO:
        return self.fs.open(self.path, "rb")

    def _key(self) -> tuple:
        return (self.fs.protocol, self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, RemoteFile) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: "RemoteFile") -> bool:
        return self.path < other.path

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteFile({self.url!r})"


CorpusPath = Union[Path, RemoteFile]


def filesystem(source: str):
    """(fsspec filesystem, path inside it) of a URL; a missing backend is a one-line DataError."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(source)
    except ImportError as e:  # fsspec names the package to install
        raise DataError(f"data source {source!r}: {e}") from None
    except ValueError as e:  # an unknown protocol
        raise DataError(f"data source {source!r}: {e}") from None


def compression(path: CorpusPath) -> Optional[str]:
    return COMPRESSIONS.get(path.suffix.lower())


def format_suffix(path: CorpusPath) -> str:
    """The suffix that says the file's format (lower case): ``.jsonl`` for ``x.jsonl.gz`` too."""
    name = path.name[: -len(path.suffix)] if compression(path) else path.name
    return PurePosixPath(name).suffix.lower()


def _decompressing(raw: BinaryIO, kind: str) -> BinaryIO:
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "bz2":
        import bz2

        return bz2.BZ2File(raw, mode="rb")
    try:
        import zstandard
    except ImportError:
        raise DataError("reading .zst files needs the zstandard package (pip install zstandard)") from None
    # zstandard's reader has no readline: buffered, it has
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def open_bytes(path: CorpusPath) -> BinaryIO:
    """The file's (decompressed) bytes, as a binary file object to use in a ``with``."""
    raw = path.open_raw() if isinstance(path, RemoteFile) else open(path, "rb")
    kind = compression(path)
    return _decompressing(raw, kind) if kind else raw


def can_seek(path: CorpusPath) -> bool:
    """Whether readers may seek in ``open_bytes(path)`` (not in a decompressing stream)."""
    return compression(path) is None


def skip(f: BinaryIO, n: int) -> int:
    """Read and drop ``n`` bytes of a stream that cannot seek; the number of bytes dropped."""
    done = 0
    while done < n:
        chunk = f.read(min(_SKIP_CHUNK, n - done))
        if not chunk:
            break
        done += len(chunk)
    return done


def read_all(path: CorpusPath) -> bytes:
    with open_bytes(path) as f:
        return f.read()


def data_size(path: CorpusPath) -> int:
    """How many bytes the file's data is (decompressed: a compressed file is read through once)."""
    if can_seek(path):
        return path.stat().st_size
    size = 0
    with open_bytes(path) as f:
        while chunk := f.read(_SKIP_CHUNK):
            size += len(chunk)
    return size


def seekable_copy(path: CorpusPath) -> Union[CorpusPath, BinaryIO]:
    """What pyarrow can read a parquet file from: the path itself (local, plain), an fsspec file,
    or, for a compressed file, its decompressed bytes in memory (parquet needs to seek)."""
    if not can_seek(path):
        return io.BytesIO(read_all(path))
    return path.open_raw() if isinstance(path, RemoteFile) else path
