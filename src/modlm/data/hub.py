"""`hub:NAME[:CONFIG]` sources: a Hugging Face dataset streamed with `datasets`.

Offline, this fails fast with a DataError (no hanging retries): the environment flags
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured, and otherwise a TCP connection to the
hub is tried with a short timeout before `datasets` is asked for anything.

The split is decided per document by a hash of its text (hub streams have no paths).
Shard `slot` of `num_slots` is `datasets.distributed.split_dataset_by_node` of the stream,
shuffled per epoch (seeded); positions count the documents of that shard's stream; a resumed shard re-reads
(without tokenizing) the rows before its position.
"""
import os
import socket
import threading
from typing import Iterator, Optional
from urllib.parse import urlparse

from .errors import DataError
from .sources import is_val

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


def parse_hub_source(source: str) -> tuple[str, Optional[str]]:
    """'hub:NAME[:CONFIG]' -> (NAME, CONFIG or None)."""
    name, _, config = source[len("hub:"):].partition(":")
    if not name:
        raise DataError(f"data source {source!r}: expected hub:NAME[:CONFIG], e.g. hub:roneneldan/TinyStories")
    return name, (config or None)


class HubCorpus:
    """A streamed Hugging Face dataset (its 'train' split), split per document by text hash."""

    num_train_docs: Optional[int] = None  # unknown for a stream

    def __init__(self, source: str, text_field: str = "text", val_fraction: float = 0.05, seed: int = 1234):
        self.source = source
        self.name, self.config = parse_hub_source(source)
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.seed = seed
        reason = hub_unreachable_reason()
        if reason:
            raise DataError(
                f"data source {source!r}: the Hugging Face Hub is unreachable ({reason}). "
                "Use local files instead: --data.source PATH (a .txt/.md/.py/.jsonl/.json/.parquet "
                "file, a folder or a glob of them) or --data.source stdlib"
            )
        self._stream = self._load()

    def _load(self):
        import datasets

        try:
            # No trust_remote_code: only datasets stored as data files can be streamed.
            return datasets.load_dataset(self.name, self.config, split="train", streaming=True)
        except Exception as e:  # datasets raises many types (not found, gated, bad config)
            raise DataError(f"data source {self.source!r}: could not open the dataset ({e})") from None

    @property
    def source_id(self) -> str:
        return f"hub:{self.name}:{self.config or ''}"

    def fingerprint(self) -> str:
        return ""  # a remote stream has no cheap content fingerprint

    def describe(self) -> str:
        return f"{self.source} (streamed)"

    def _rows(self, stream) -> Iterator[Optional[str]]:
        """The text of every row, None for a non-string one (so row positions stay exact)."""
        for batch in stream.iter(batch_size=256):  # .iter() does its own, unsharded, iteration
            if self.text_field not in batch:
                raise DataError(
                    f"data source {self.source!r}: no '{self.text_field}' column "
                    f"(columns: {', '.join(batch)}); set --data.text_field"
                )
            for text in batch[self.text_field]:
                yield text if isinstance(text, str) else None

    def _texts(self, stream) -> Iterator[str]:
        return (text for text in self._rows(stream) if text is not None)

    def train_texts(self) -> Iterator[str]:
        return (t for t in self._texts(self._stream) if not is_val(t, self.val_fraction))

    def val_texts(self) -> Iterator[str]:
        return (t for t in self._texts(self._stream) if is_val(t, self.val_fraction))

    def slot_docs(self, slot: int, num_slots: int, epoch: int, start: int = 0) -> Iterator[tuple[int, str]]:
        from datasets.distributed import split_dataset_by_node

        # A seed per (seed, epoch): reshuffles shard order and the buffer every epoch.
        epoch_seed = (self.seed * 1_000_003 + epoch) % 2**32
        stream = self._stream.shuffle(seed=epoch_seed, buffer_size=SHUFFLE_BUFFER)
        stream = split_dataset_by_node(stream, rank=slot, world_size=num_slots)
        # Resuming reads past the first `start` rows instead of IterableDataset.skip(),
        # which would change the shuffled order (costs bandwidth, not tokenization).
        for pos, text in enumerate(self._rows(stream)):
            if pos >= start and text is not None and not is_val(text, self.val_fraction):
                yield pos, text
