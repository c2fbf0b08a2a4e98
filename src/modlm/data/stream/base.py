"""The training stream interface: one rank's endless batches, and the position that resumes them.

A rank runs ``num_workers`` dataloader workers (1 "logical" worker when loading in the main
process). Each logical worker builds whole batches and sends each with its *place* after it (what
that worker needs to continue: a document and token offset for text, a batch number for tokens);
the stream kind decides what a place holds, always a small JSON-able dict.

Position. A rank's ``StreamPosition`` is every logical worker's place plus which worker delivers
the next batch: torch's DataLoader takes batches from its workers round-robin, and a new DataLoader
always starts at physical worker 0, so physical worker p plays logical worker
(p + next_worker) % logical_workers and the round-robin continues where it stopped.

Every stream kind answers the same four questions (``TrainStream``): where it starts
(``initial_position``), a copy of it that starts elsewhere (``starting_at``), what a checkpoint
keeps of a position (``save``) and the position a saved one resumes at (``restore``). The
``ResumableLoader`` (loader.py) tracks positions; the data module only hands saved state back and forth.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError


@dataclass
class StreamPosition:
    """Where one rank's training stream is, after the batches consumed so far."""

    workers: list[dict]
    """Each logical worker's place (the stream kind's own JSON-able dict)."""
    next_worker: int = 0
    """The logical worker that delivers the rank's next batch."""
    batches: int = 0
    """Batches consumed on this rank (kept in a text checkpoint for the record; no place depends on it)."""

    def after(self, worker: int, place: dict, logical_workers: int) -> StreamPosition:
        """The position once the batch ``worker`` sent with ``place`` is consumed."""
        return StreamPosition(
            workers=[place if w == worker else p for w, p in enumerate(self.workers)],
            next_worker=(worker + 1) % logical_workers,
            batches=self.batches + 1,
        )

    def to_dict(self) -> dict:
        return asdict(self)  # a deep copy: safe to keep while the stream moves on

    @classmethod
    def from_dict(cls, saved: dict) -> StreamPosition:
        return cls(copy.deepcopy(saved["workers"]), saved["next_worker"], saved.get("batches", 0))


def other_kind_of_source() -> DataError:
    """A checkpoint's data state was written by the other stream kind."""
    return DataError(
        "the checkpoint's data position is for another kind of source (prepared token shards "
        "vs text files); resume with the --data.source it was trained on"
    )


class TrainStream(IterableDataset, ABC):
    """Endless (batch LongTensor (batch_size, seq_len + 1), logical worker, its place after the
    batch) of one rank, used through ``ResumableLoader``."""

    def __init__(self, seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int):
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.logical_workers = max(1, num_workers)
        self._start: Optional[StreamPosition] = None  # where iteration begins; see starting_at

    @abstractmethod
    def initial_position(self) -> StreamPosition:
        """The position of a run that has read nothing yet."""

    def starting_at(self, position: StreamPosition) -> TrainStream:
        """A copy of this stream whose iteration begins at ``position``, to hand to a DataLoader;
        this stream is left as it was."""
        stream = copy.copy(self)  # through __getstate__: per-process handles are left out
        stream._start = copy.deepcopy(position)
        return stream

    @abstractmethod
    def save(self, position: StreamPosition) -> dict:
        """What a checkpoint keeps of this rank's ``position`` (JSON-able; under DDP/FSDP every rank
        calls it, as Lightning's checkpointing does, so it may gather from all ranks)."""

    @abstractmethod
    def restore(self, saved: dict) -> StreamPosition:
        """The position to continue from after ``save``'s output (of this run's layout or another:
        a kind that cannot continue exactly says so in a DataWarning). Raises DataError for the
        state of the other stream kind."""

    @abstractmethod
    def worker_batches(self, physical: int, position: StreamPosition) -> Iterator[tuple[torch.Tensor, int, dict]]:
        """The batches dataloader worker ``physical`` sends when iteration begins at ``position``."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, dict]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        return self.worker_batches(physical, self._start or self.initial_position())


__all__ = ["StreamPosition", "TrainStream", "other_kind_of_source"]
