"""ResumableLoader: the training dataloader, with a position that can be saved and restored.

It wraps a torch DataLoader over a PackedTrainStream (workers build whole batches and
send each with their stream position) and yields plain LongTensor batches
(batch_size, seq_len + 1). It keeps the stream state *after the batches consumed*:

- used by hand (no trainer), a batch counts as consumed when it is yielded;
- in a Lightning fit the DataModule calls `mark_consumed()` from its
  `on_before_batch_transfer` hook, because Lightning fetches one batch ahead: a batch
  that was fetched but not yet trained on must not count, or a resume would skip it.

Iterating again (a new `iter()`) restarts from the consumed position, dropping batches
that were fetched ahead, so the same windows come next in either case.
"""
import copy
import warnings
from collections import deque

from torch.utils.data import DataLoader

from .dataset import PackedTrainStream
from .errors import DataWarning

_MAX_AHEAD = 16  # more unconsumed batches than this means nobody is calling mark_consumed()


class ResumableLoader:
    """Iterable of training batches with `position()` / `seek(position)`.

    (Deliberately not named state_dict/load_state_dict: Lightning would then save this
    loader's state from rank 0 only and restore it on every rank. The DataModule saves
    the positions of all ranks instead; see datamodule.py.)"""

    def __init__(self, dataset: PackedTrainStream, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.track_consumption = False
        self._state = {**dataset.initial_state(), "batches": 0}
        self._ahead: deque = deque()  # states after batches yielded but not yet consumed

    def __iter__(self):
        self._ahead.clear()  # batches fetched ahead by a previous iterator are redone
        loader = DataLoader(
            self.dataset.starting_at(self._state),
            batch_size=None,  # workers already yield whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # prefetch 2 batches/worker (torch's default): enough to hide tokenization
        )
        for batch, worker, position in loader:
            last = self._ahead[-1] if self._ahead else self._state
            state = {
                "workers": [position if w == worker else p for w, p in enumerate(last["workers"])],
                "next_worker": (worker + 1) % self.dataset.logical_workers,
                "batches": last["batches"] + 1,
            }
            if self.track_consumption:
                self._ahead.append(state)
                if len(self._ahead) > _MAX_AHEAD:
                    self._stop_tracking()
            else:
                self._state = state
            yield batch

    def _stop_tracking(self) -> None:
        warnings.warn(
            "train batches are fetched but never marked consumed (is training_step taking a "
            "dataloader_iter?); the saved data position now counts fetched batches",
            DataWarning,
        )
        self.track_consumption = False
        self._state = self._ahead[-1]
        self._ahead.clear()

    def mark_consumed(self) -> None:
        """The oldest fetched batch is being trained on now."""
        if self._ahead:
            self._state = self._ahead.popleft()

    def position(self) -> dict:
        """This rank's stream state after the consumed batches (JSON-able)."""
        return {
            **copy.deepcopy(self._state),
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.dataset.logical_workers,
            "seq_len": self.dataset.seq_len,
            "batch_size": self.dataset.batch_size,
        }

    def seek(self, position: dict) -> None:
        """Continue from a `position()` (takes effect at the next iter())."""
        self._ahead.clear()
        self._state = {
            "workers": copy.deepcopy(position["workers"]),
            "next_worker": position["next_worker"],
            "batches": position.get("batches", 0),
        }
