"""Training order: how the run's seed and the epoch decide the order training data is read in.

Every shuffle of the data layer draws from here, so a run and its resume (which recompute the
order from the seed and the saved epoch) read the same data:

- a file corpus visits its files in the order ``shuffled`` gives;
- a hub stream is shuffled by ``datasets`` with a seed made by ``epoch_seed``;
- a prepared folder's windows follow the permutation ``permute``, keyed by ``epoch_seed``.

The two recipes (a string-seeded ``random.Random`` for files, ``epoch_seed`` for the rest) are
kept as they were first written: changing either would change the batches of every existing run.
"""

import random
from typing import Iterable, TypeVar

import numpy as np

T = TypeVar("T")

_EPOCH_STRIDE = 1_000_003  # more epochs than any run reaches: two (seed, epoch) pairs never share a seed


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` of a run seeded ``seed`` (distinct for every pair while
    ``epoch < 1_000_003``). Callers that need a bounded seed reduce it themselves."""
    return seed * _EPOCH_STRIDE + epoch


def shuffled(items: Iterable[T], seed: int, epoch: int) -> list[T]:
    """``items`` in epoch ``epoch``'s order (a file corpus's files)."""
    order = list(items)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


# --- a stateless shuffle of any number of windows --------------------------------------------------
_MASK64 = 2**64 - 1


def _mix(x: np.ndarray, key: int, round_: int) -> np.ndarray:
    # splitmix64's finalizer on (x, key, round): a fast, well-spread round function.
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
            (key * 0xBF58476D1CE4E5B9 + round_ * 0x94D049BB133111EB) & _MASK64
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Entries ``index`` of a pseudo-random permutation of ``range(n)`` drawn from ``key``.

    A 4-round Feistel network on the smallest even number of bits that holds ``n``, cycle-walked
    back into range: a true permutation, computed per entry, so no table of ``n`` entries is kept
    (an epoch of a 100B-token corpus has ~10^8 windows)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & low
        for r in range(4):
            left, right = right, left ^ (_mix(right, key, r) & low)
        return (left << half) | right

    out = feistel(np.asarray(index, dtype=np.uint64))
    while (outside := out >= np.uint64(n)).any():  # at most 4x the range: a few passes
        out[outside] = feistel(out[outside])
    return out.astype(np.int64)
