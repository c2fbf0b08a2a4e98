"""Rows of a decoding state that come and go: continuous batching over routed caches.

A server decodes many requests as one batch, and requests arrive and finish at any step. Each row of
a ``DecodeState`` is one request: its caches (a routed block's hold only the tokens that block
processed, so rows differ in length block by block), its token count and the per-row state of the
causal decision (a controller's threshold, running router moments). ``RowPool`` keeps one state of
``capacity`` rows, allocated once, with the running rows first: a new request is prefilled into the
first free row, in place, and joins; a finished one leaves and the last running row moves into its
place. Decoding runs on the running rows only, through a ``DecodeState`` whose buffers are views of
the pool's (``KVCache.ROW_BUFFERS``: what the model writes in place lands in the pool), so a step
costs what a batch of that many rows costs, and a row's answer never depends on the others.

Written here by hand because the per-row state is MoD's own: which tensors a row owns is declared
beside them (``ROW_BUFFERS``, written in place; ``ROW_STATE``, replaced by the model every step and so
carried back into the pool whenever the running rows change).
"""
from __future__ import annotations

import copy
from typing import Iterator, Optional

from .kv_cache import DecodeState, KVCache, StackCache


def _holders(state: DecodeState) -> Iterator:
    """Every object of ``state`` that holds per-row tensors: its caches, a recursion's step caches and
    theirs, the state itself."""
    for entry in state.caches:
        for cache in entry if isinstance(entry, list) else [entry]:
            yield cache
            if isinstance(cache, StackCache):
                yield from (block for block in cache.blocks if block is not None)
    yield state


def _rows_of(holder, start: int, stop: int, fresh: bool):
    """``holder`` (a cache or the state) over rows [start, stop): its row buffers as views, its row
    state as slices (None with ``fresh``: rows about to take a prompt start the decision afresh)."""
    view = copy.copy(holder)
    for name in getattr(holder, "ROW_BUFFERS", ()):
        setattr(view, name, getattr(holder, name)[start:stop])
    for name in getattr(holder, "ROW_STATE", ()):
        value = getattr(holder, name)
        setattr(view, name, None if fresh or value is None else value[start:stop])
    if isinstance(holder, KVCache):  # the rows a view writes are its own 0..n-1
        view.all_rows = holder.all_rows[: stop - start]
    if isinstance(holder, StackCache):
        view.blocks = [None if block is None else _rows_of(block, start, stop, fresh) for block in holder.blocks]
    return view


class RowPool:
    """A ``DecodeState`` of ``capacity`` rows, the first ``running`` of them decoding.

    ``fresh()`` is the first free row, empty, to prefill a prompt into (``model.prefill(prompt,
    pool.fresh())``); ``join(view)`` makes it a running row; ``state`` is the running rows' state for
    ``model.decode_step``; ``release(rows)`` ends rows and says which rows moved where.
    """

    def __init__(self, state: DecodeState):
        self.pool = state
        self.capacity = int(state.seen.numel())
        self.running = 0
        """Rows decoding: rows 0 .. running - 1."""
        self.state: Optional[DecodeState] = None
        """The running rows as a state of their own (None when no row runs)."""

    def fresh(self) -> DecodeState:
        """The first free row as a one-row state with nothing in it (no cached token, no decision
        state), for a prompt's prefill; it decodes nothing until ``join``."""
        if self.running == self.capacity:
            raise RuntimeError("every row of the pool is running")  # the caller admits only into free rows
        row = self.running
        for holder in _holders(self.pool):
            if isinstance(holder, KVCache):
                holder.length[row] = 0
                holder.positions[row] = -1  # read by recursive KV sharing: no stale entry may look real
        self.pool.seen[row] = 0
        view = self.view(row, row + 1, fresh=True)
        view.filled = 0
        return view

    def join(self, view: DecodeState) -> int:
        """Make the row ``fresh`` gave (its prompt prefilled into ``view``) a running row; returns it."""
        self._take_back(self.state, 0)
        self._take_back(view, self.running)
        self.running += 1
        self._rebuild()
        return self.running - 1

    def release(self, rows: list[int]) -> dict[int, int]:
        """End the running ``rows``; the last running rows move into their places so the running
        ones stay first. Returns ``{old row: new row}`` for every row that moved."""
        self._take_back(self.state, 0)
        ending = set(rows)
        keep = [r for r in range(self.running) if r not in ending]
        moved = {}
        holes = iter(sorted(r for r in ending if r < len(keep)))
        for src in reversed(keep):
            if src < len(keep):
                break
            dst = next(holes)
            self._move(src, dst)
            moved[src] = dst
        self.running = len(keep)
        self._rebuild()
        return moved

    def view(self, start: int, stop: int, fresh: bool = False) -> DecodeState:
        """Rows [start, stop) of the pool as a state of their own, sharing its buffers."""
        state = _rows_of(self.pool, start, stop, fresh)
        state.caches = [[_rows_of(c, start, stop, fresh) for c in entry] if isinstance(entry, list)
                        else _rows_of(entry, start, stop, fresh) for entry in self.pool.caches]
        return state

    def _rebuild(self) -> None:
        if self.running == 0:
            self.state = None
            return
        self.state = self.view(0, self.running)
        # the host's bound on every running row's count: read once here, not on every step
        self.state.filled = int(self.pool.seen[: self.running].max())

    def _take_back(self, view: Optional[DecodeState], start: int) -> None:
        """Copy into the pool the row state ``view`` (rows from ``start``) holds: the decision state
        the model replaced while the view decoded."""
        if view is None:
            return
        for mine, theirs in zip(_holders(self.pool), _holders(view)):
            for name in getattr(mine, "ROW_STATE", ()):
                value = getattr(theirs, name)
                if value is None:
                    continue
                pooled = getattr(mine, name)
                if pooled is None:
                    pooled = value.new_zeros((self.capacity, *value.shape[1:]))
                    setattr(mine, name, pooled)
                pooled[start:start + value.size(0)] = value

    def _move(self, src: int, dst: int) -> None:
        """Row ``src``'s every per-row tensor into row ``dst``."""
        for holder in _holders(self.pool):
            for name in (*getattr(holder, "ROW_BUFFERS", ()), *getattr(holder, "ROW_STATE", ())):
                tensor = getattr(holder, name)
                if tensor is not None:
                    tensor[dst] = tensor[src]

