"""The loaders Lightning gets: ``ResumableLoader`` for training, ``FixedBatches`` for validation.

ResumableLoader wraps a torch DataLoader over a training stream (``TrainStream``: workers build
whole batches and send each with their place after it) and yields plain LongTensor batches
(batch_size, seq_len + 1). It keeps the stream position *after the batches consumed*:

- used by hand (no trainer), a batch counts as consumed when it is yielded;
- in a Lightning fit the DataModule calls `mark_consumed()` from its
  `on_before_batch_transfer` hook, because Lightning fetches one batch ahead: a batch
  that was fetched but not yet trained on must not count, or a resume would skip it.

Iterating again (a new `iter()`) restarts from the consumed position, dropping batches
that were fetched ahead, so the same windows come next in either case.
"""

import warnings
from collections import deque
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..errors import DataWarning
from .base import StreamPosition, TrainStream
from .chat import chat_batch

_MAX_AHEAD = 16  # more unconsumed batches than this means nobody is calling mark_consumed()


class ResumableLoader:
    """Iterable of training batches whose position can be saved (`saved_state`) and restored.

    (Deliberately not named state_dict/load_state_dict: Lightning would then save this
    loader's state from rank 0 only and restore it on every rank. The DataModule saves
    the state of all ranks instead; see datamodule.py.)"""

    def __init__(self, dataset: TrainStream, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset  # the name torch and Lightning look for on a loader
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.track_consumption = False
        self._position = dataset.initial_position()
        self._ahead: deque = deque()  # positions after batches yielded but not yet consumed

    def __iter__(self):
        self._ahead.clear()  # batches fetched ahead by a previous iterator are redone
        loader = DataLoader(
            self.dataset.starting_at(self._position),
            batch_size=None,  # workers already yield whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # prefetch 2 batches/worker (torch's default): enough to hide tokenization
        )
        for batch, worker, place in loader:
            last = self._ahead[-1] if self._ahead else self._position
            position = last.after(worker, place, self.dataset.logical_workers)
            if self.track_consumption:
                self._ahead.append(position)
                if len(self._ahead) > _MAX_AHEAD:
                    self._stop_tracking()
            else:
                self._position = position
            yield batch

    def _stop_tracking(self) -> None:
        warnings.warn(
            "train batches are fetched but never marked consumed (is training_step taking a "
            "dataloader_iter?); the saved data position now counts fetched batches",
            DataWarning,
        )
        self.track_consumption = False
        self._position = self._ahead[-1]
        self._ahead.clear()

    def mark_consumed(self) -> None:
        """The oldest fetched batch is being trained on now."""
        if self._ahead:
            self._position = self._ahead.popleft()

    def position(self) -> StreamPosition:
        """This rank's stream position after the consumed batches (a copy)."""
        return StreamPosition.from_dict(self._position.to_dict())

    def seek(self, position: StreamPosition) -> None:
        """Continue from `position` (takes effect at the next iter())."""
        self._ahead.clear()
        self._position = StreamPosition.from_dict(position.to_dict())

    def saved_state(self) -> dict:
        """What a checkpoint keeps of this rank's position (the stream kind's ``save``)."""
        return self.dataset.save(self.position())

    def restore(self, saved: dict) -> None:
        """Continue where ``saved_state()``'s output left off (takes effect at the next iter())."""
        self.seek(self.dataset.restore(saved))


class FixedBatches:
    """A sized, re-iterable set of precomputed batches (the validation windows of a rank; with a
    ``loss_mask``, (n, T) bools, chat batches: ``stream.chat.chat_batch``).

    Not a list, which Lightning would take for several dataloaders; not a DataLoader over
    a map-style dataset, which Lightning would split among ranks again with a DistributedSampler."""

    def __init__(self, windows: torch.Tensor, batch_size: int, loss_mask: Optional[torch.Tensor] = None):
        self.batches = list(windows.split(batch_size)) if len(windows) else []
        if loss_mask is not None:
            self.batches = [chat_batch(w, m) for w, m in zip(self.batches, loss_mask.split(batch_size))]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
