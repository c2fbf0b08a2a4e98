"""Rows of a decoding state that come and go: continuous batching over routed caches.

A server decodes many requests as one batch, and requests arrive and finish at any step. Each row of
a ``DecodeState`` is one request: its caches (a routed block's hold only the tokens that block
processed, so rows differ in length block by block), its token count and the per-row state of the
causal decision (a controller's threshold, running router moments: a ``DecisionState``). ``RowPool`` keeps one state of
``capacity`` rows, allocated once, with the running rows first: a new request's prompt is prefilled
into a state of its own, which then joins (copied into the first free row); a finished request
leaves, and the last running row moves into its place. Decoding runs on the running rows only,
through a ``DecodeState`` whose buffers are views of the pool's (what the model writes in place
lands in the pool), so a step costs what a batch of that many rows costs, and a row's answer never
depends on the others.

Written here by hand because the per-row state is MoD's own: which tensors a row owns is declared
beside them (``ROW_BUFFERS``); the model writes every one of them in place, so a view's rows are the
pool's.
"""

from __future__ import annotations

import copy
from typing import Optional

from .kv_cache import DecodeState, KVCache, StackCache


def _rows_of(holder, start: int, stop: int):
    """``holder`` (a cache or the state) over rows [start, stop): its row buffers (and its decision
    state's) as views."""
    view = copy.copy(holder)
    for name in getattr(holder, "ROW_BUFFERS", ()):
        setattr(view, name, getattr(holder, name)[start:stop])
    if getattr(holder, "decision", None) is not None:
        view.decision = _rows_of(holder.decision, start, stop)
    if isinstance(holder, KVCache):  # the rows a view writes are its own 0..n-1
        view.all_rows = holder.all_rows[: stop - start]
    if isinstance(holder, StackCache):
        view.blocks = [None if block is None else _rows_of(block, start, stop) for block in holder.blocks]
    return view


class RowPool:
    """A ``DecodeState`` of ``capacity`` rows, the first ``running`` of them decoding.

    A request's prompt is prefilled into a state of its own (``model.new_state(1)``, in as many
    ``prefill`` calls as it likes, between steps of the running rows); ``join(state)`` copies it into
    the first free row and makes that row run; ``state`` is the running rows' state for
    ``model.decode_step``; ``release(rows)`` ends rows and says which rows moved where.
    """

    def __init__(self, state: DecodeState):
        self.full = state
        """The state of every row, running or free."""
        self.capacity = int(state.seen.numel())
        self.running = 0
        """Rows decoding: rows 0 .. running - 1."""
        self.state: Optional[DecodeState] = None
        """The running rows as a state of their own (None when no row runs)."""

    def join(self, one: DecodeState) -> int:
        """Copy ``one``, a one-row state (a prompt prefilled), into the first free row and make it a
        running row; returns the row."""
        if self.running == self.capacity:
            raise RuntimeError("every row of the pool is running")  # the caller admits only into free rows
        row = self.running
        for mine, theirs in zip(self.full.holders(), one.holders()):
            for name in getattr(mine, "ROW_BUFFERS", ()):  # the whole row: no entry of an earlier request stays
                getattr(mine, name)[row] = getattr(theirs, name)[0]
        self.running += 1
        self._rebuild()
        return row

    def release(self, rows: list[int]) -> dict[int, int]:
        """End the running ``rows``; the last running rows move into their places so the running
        ones stay first. Returns ``{old row: new row}`` for every row that moved."""
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

    def view(self, start: int, stop: int) -> DecodeState:
        """Rows [start, stop) of the pool as a state of their own, sharing its buffers."""
        state = _rows_of(self.full, start, stop)
        state.caches = [
            [_rows_of(c, start, stop) for c in entry] if isinstance(entry, list) else _rows_of(entry, start, stop)
            for entry in self.full.caches
        ]
        return state

    def _rebuild(self) -> None:
        if self.running == 0:
            self.state = None
            return
        self.state = self.view(0, self.running)
        # the host's bound on every running row's count: read once here, not on every step
        self.state.filled = int(self.full.seen[: self.running].max())

    def _move(self, src: int, dst: int) -> None:
        """Row ``src``'s every per-row tensor into row ``dst``."""
        for holder in self.full.holders():
            for name in getattr(holder, "ROW_BUFFERS", ()):
                tensor = getattr(holder, name)
                tensor[dst] = tensor[src]
