"""`hub:NAME[:CONFIG][@REVISION]` sources: a Hugging Face dataset streamed with `datasets`.

Pinned. The dataset is read at one commit: REVISION (a branch, tag or commit) resolved to its
commit hash when the run opens it, or the main branch's current commit. The hash is part of the
tokenizer cache key and of every checkpoint (the data module's state), so an update upstream can
neither reuse a tokenizer trained on other data nor silently change what a resumed run reads:
resuming from a checkpoint of another commit is refused, naming the ``@REVISION`` to use.

Validation. A dataset with its own ``validation`` split is validated on it (and trains on all of
``train``); otherwise documents are split by a hash of their text, as below.

Offline (the environment flags HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured, and otherwise a
TCP connection to the hub is tried with a short timeout before `datasets` is asked for anything),
a dataset in the local Hugging Face cache (``hf download --repo-type dataset NAME``) is read from
there, at the cached commit of REVISION (or of the main branch): the same commit, so the same pins.
Any other dataset fails fast with a DataError (no hanging retries).

Records. With ``text_field=None`` (``as_records``) every row is read whole, as its JSON text: for a
reader of structured rows (conversations, ``corpus/chat.py``).

The split is decided per document by a hash of its text (hub streams have no paths).
Part `part` of `num_parts` is `datasets.distributed.split_dataset_by_node` of the stream,
shuffled per epoch (seeded, order.py); positions count the rows of that part's stream; a resumed
part re-reads (without tokenizing) the rows before its position.
"""

import copy
import json
import os
import socket
import threading
from typing import Iterator, Optional
from urllib.parse import urlparse

from ...model.errors import first_line
from ..errors import DataError
from ..order import epoch_seed
from .base import TextCorpus
from .split import is_val

_TRUE = {"1", "true", "yes", "on"}
PROBE_TIMEOUT_S = 3.0
SHUFFLE_BUFFER = 10_000


def hub_unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None if the hub answers a TCP connect within `timeout` seconds, else why not."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[Optional[str]] = []

    def probe() -> None:  # in a thread, because DNS lookups ignore socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"cannot connect to {host}:{port} ({e.__class__.__name__}: {e})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:.0f}s"


def split_revision(source: str) -> tuple[str, Optional[str]]:
    """'hub:NAME[:CONFIG]@REVISION' -> ('hub:NAME[:CONFIG]', REVISION or None)."""
    base, at, revision = source.partition("@")
    if at and not revision:
        raise DataError(f"data source {source!r}: expected hub:NAME[:CONFIG]@REVISION (a branch, tag or commit)")
    return base, (revision or None)


def parse_hub_source(source: str) -> tuple[str, Optional[str]]:
    """'hub:NAME[:CONFIG][@REVISION]' -> (NAME, CONFIG or None)."""
    name, _, config = split_revision(source)[0][len("hub:") :].partition(":")
    if not name:
        raise DataError(f"data source {source!r}: expected hub:NAME[:CONFIG], e.g. hub:roneneldan/TinyStories")
    return name, (config or None)


class HubCorpus(TextCorpus):
    """A streamed Hugging Face dataset (its 'train' split), split per document by text hash."""

    num_train_docs: Optional[int] = None  # unknown for a stream
    num_val_docs: Optional[int] = None
    own_validation = False  # the dataset's own validation split is used (set when opened)
    revision: Optional[str] = None  # the commit read (set when opened)
    location: Optional[str] = None  # what `datasets` opens: the Hub name, or its cached snapshot folder

    def __init__(self, source: str, *, text_field: Optional[str], val_fraction: float, seed: int):
        self.source = source
        self.name, self.config = parse_hub_source(source)
        self.requested_revision = split_revision(source)[1]
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.seed = seed
        reason = hub_unreachable_reason()
        if reason:
            self.location = self._cached_snapshot()
            if self.location is None:
                raise DataError(
                    f"data source {source!r}: the Hugging Face Hub is unreachable ({reason}) and the dataset is "
                    "not in the local Hugging Face cache. Use local files instead: --data.source PATH (a "
                    ".txt/.md/.py/.jsonl/.json/.parquet file, plain or compressed, a folder, a glob or a URL of "
                    "them) or --data.source stdlib"
                )
            self.revision = os.path.basename(self.location)  # a snapshot folder is named by its commit
        else:
            self.location = self.name
            self.revision = self._resolve_revision()
        self.own_validation = "validation" in self._split_names()
        self._stream = self._load("train")
        self._val_stream = self._load("validation") if self.own_validation else None

    def _resolve_revision(self) -> str:
        """The commit hash of the requested revision (or of the main branch)."""
        from huggingface_hub import HfApi

        try:
            return HfApi().dataset_info(self.name, revision=self.requested_revision).sha
        except Exception as e:  # noqa: BLE001 - not found, gated, no such revision: all the user's to fix
            what = f"revision {self.requested_revision!r} of " if self.requested_revision else ""
            first = first_line(e)
            raise DataError(f"data source {self.source!r}: cannot resolve {what}the dataset ({first})") from None

    def _cached_snapshot(self) -> Optional[str]:
        """The local cache's snapshot folder of the requested revision, if it holds one."""
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(
                self.name, repo_type="dataset", revision=self.requested_revision, local_files_only=True
            )
        except Exception:  # noqa: BLE001 - not cached (or not at that revision): the caller says so
            return None

    def _split_names(self) -> list[str]:
        import datasets

        try:
            return list(datasets.get_dataset_split_names(self.location, self.config, **self._at()))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data source {self.source!r}: could not list the dataset's splits ({e})") from None

    def _load(self, split: str):
        import datasets

        try:
            # No trust_remote_code: only datasets stored as data files can be streamed.
            return datasets.load_dataset(self.location, self.config, split=split, streaming=True, **self._at())
        except Exception as e:  # datasets raises many types (not found, gated, bad config)
            raise DataError(f"data source {self.source!r}: could not open the dataset ({e})") from None

    def _at(self) -> dict:
        """The revision for `datasets`: a cached snapshot folder is already one commit."""
        return {} if self.location != self.name else {"revision": self.revision}

    @property
    def source_id(self) -> str:
        return f"hub:{self.name}:{self.config or ''}@{self.revision}"

    def fingerprint(self) -> str:
        return ""  # a remote stream has no cheap content fingerprint

    def describe(self) -> str:
        val = "its validation split" if self.own_validation else "hashed validation"
        where = "from the local cache" if self.location != self.name else "streamed"
        return f"{self.source} ({where} at commit {self.revision[:12]}, {val})"

    def pins(self) -> dict:
        """The commit read: a resumed run must read the same one."""
        return {"hub_revision": self.revision} if self.revision else {}

    def check_pins(self, pins: dict) -> None:
        saved = pins.get("hub_revision")
        if saved and saved != self.revision:
            base = self.source.partition("@")[0]
            raise DataError(
                f"the checkpoint read {base} at commit {saved}, this run opens commit "
                f"{self.revision}: resume with --data.source {base}@{saved}"
            )

    def as_records(self) -> "HubCorpus":
        """This dataset read row by row, each row whole as its JSON text (``text_field=None``)."""
        records = copy.copy(self)
        records.text_field = None
        return records

    def first_row(self) -> Optional[dict]:
        """The first row of the train split (None: it has none), to tell what the rows are."""
        for batch in self._stream.iter(batch_size=1):
            return {column: values[0] for column, values in batch.items()}
        return None

    def _rows(self, stream) -> Iterator[Optional[str]]:
        """The text of every row, None for a non-string one (so row positions stay exact); without a
        ``text_field``, every row as its JSON text."""
        # .iter(), unlike iter(stream), reads every row itself, never splitting them among dataloader workers
        for batch in stream.iter(batch_size=256):
            if self.text_field is None:
                columns = list(batch)
                for row in zip(*batch.values()):
                    yield json.dumps(dict(zip(columns, row)), default=str)
                continue
            if self.text_field not in batch:
                raise DataError(
                    f"data source {self.source!r}: no '{self.text_field}' column "
                    f"(columns: {', '.join(batch)}); set --data.text_field"
                )
            for text in batch[self.text_field]:
                yield text if isinstance(text, str) else None

    def _texts(self, stream) -> Iterator[str]:
        return (text for text in self._rows(stream) if text is not None)

    def _in_val(self, text: str) -> bool:
        """Whether a row of the train split is held out (never, when the dataset has a validation split)."""
        return not self.own_validation and is_val(text, self.val_fraction)

    def train_texts(self) -> Iterator[str]:
        return (t for t in self._texts(self._stream) if not self._in_val(t))

    def every_record(self) -> Iterator[tuple[str, str, bool]]:
        """Every row of the train split, then of its own validation split, in order: where it is (its row),
        its text, and whether it is held out for validation."""
        for n, text in enumerate(self._rows(self._stream), 1):
            if text is not None:
                yield f"{self.source} row {n}", text, self._in_val(text)
        if self.own_validation:
            for n, text in enumerate(self._rows(self._val_stream), 1):
                if text is not None:
                    yield f"{self.source} validation row {n}", text, True

    def val_texts(self) -> Iterator[str]:
        if self.own_validation:
            return self._texts(self._val_stream)
        return (t for t in self._texts(self._stream) if is_val(t, self.val_fraction))

    def part_docs(self, part: int, num_parts: int, epoch: int, start: int = 0) -> Iterator[tuple[int, str]]:
        from datasets.distributed import split_dataset_by_node

        # A seed per (seed, epoch), in 32 bits: reshuffles the order of the dataset's files and the
        # buffer every epoch.
        stream = self._stream.shuffle(seed=epoch_seed(self.seed, epoch) % 2**32, buffer_size=SHUFFLE_BUFFER)
        stream = split_dataset_by_node(stream, rank=part, world_size=num_parts)
        # Resuming reads past the first `start` rows instead of IterableDataset.skip(),
        # which would change the shuffled order (costs bandwidth, not tokenization).
        for pos, text in enumerate(self._rows(stream)):
            if pos >= start and text is not None and not self._in_val(text):
                yield pos, text
