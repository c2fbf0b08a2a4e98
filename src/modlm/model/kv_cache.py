"""Key/value caches for incremental decoding: one per block, preallocated, with a length per row.

Rows fill at different rates: prompts have different lengths, and a routed block only stores the
tokens its causal decision processed (that is where MoD's decode speed comes from: a skipped token
costs that block nothing and leaves no entry). So each row keeps its own length, and every entry
remembers the original position of its token (keys are stored already rotated by RoPE at that
position; an empty slot has position -1).

Buffers are allocated once, for ``max_len`` slots and one spare slot after them, and never grow or
move: a decoding step writes one slot per row and attends through a mask, with no host
synchronisation, so a whole step can be captured by ``torch.compile`` (or a CUDA graph). A row whose
token in that step is not real (a routed block that skipped it, under the static policy) writes into
the spare slot, which no real query ever sees, so a full row is never written past its end. Many new
tokens at once (a prompt) take the exact path, which writes only the real entries and may read
lengths on the host.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch


class KVCache:
    ROW_BUFFERS = ("k", "v", "positions", "length")
    """Per-row tensors, written in place (rows that come and go, ``rows.py``, share them by slicing)."""

    def __init__(self, batch_size: int, max_len: int, n_heads: int, head_dim: int, device=None, dtype=None):
        self.max_len = max_len
        """Slots per row: the longest sequence the cache can hold (the spare slot not counted)."""
        # Zeros, not empty: queries of padding and of skipped rows read slots no real token wrote;
        # their outputs are dropped, but must stay finite.
        self.k = torch.zeros(batch_size, n_heads, max_len + 1, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((batch_size, max_len + 1), -1, dtype=torch.long, device=device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(max_len + 1, device=device)
        self.all_rows = torch.arange(batch_size, device=device)
        self.decision = None
        """A routed block's ``DecisionState`` (``decision.py``): what its causal decision carries from one
        token to the next per row (None for a dense block's cache)."""

    def reset(self) -> None:
        """Empty every row, in place (the buffers stay where they are)."""
        self.k.zero_()
        self.v.zero_()
        self.positions.fill_(-1)
        self.length.zero_()

    def store(self, k, v, index, n_real=None, rows=None, span=None):
        """Store new keys/values (B, H, n, hd); return what the new queries attend to.

        ``index`` (B, n) are the tokens' original positions; the first ``n_real[b]`` tokens of row
        b are real (all when None), the rest padding, never stored. ``rows`` names the cache rows
        of a subset of rows (one token each). ``span`` bounds the slots read (None: every slot).
        Returns keys, values and the boolean attention mask: query j of row b sees that row's
        earlier entries and the new ones up to itself.
        """
        if k.size(2) == 1:
            return self._store_one(k, v, index[:, 0], n_real, rows, span)
        assert rows is None, "a subset of rows only ever decodes one token"
        return self._store_many(k, v, index, n_real)

    def _store_one(self, k, v, position, n_real, rows, span):
        """One token per row, static shapes: every row writes the slot after its entries, or the
        spare slot when its token is not real (``n_real`` 0: its length does not move)."""
        span = self.max_len + 1 if span is None else span
        # All rows: the slot is the length itself, read by the mask and the writes before it moves.
        slot = self.length if rows is None else self.length.index_select(0, rows)
        at = self.all_rows if rows is None else rows
        if n_real is not None:
            slot = torch.where(n_real > 0, slot, self.max_len)
            position = position.masked_fill(n_real == 0, -1)
        mask = (self.slot_ids[:span] <= slot.unsqueeze(1))[:, None, None, :]  # (n, 1, 1, span)
        self.k[at, :, slot] = k[:, :, 0]
        self.v[at, :, slot] = v[:, :, 0]
        self.positions[at, slot] = position
        keys, values = self.k[:, :, :span], self.v[:, :, :span]
        if rows is None:
            self.length += 1 if n_real is None else n_real
        else:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
            self.length.index_add_(0, rows, torch.ones_like(rows) if n_real is None else n_real)
        return keys, values, mask

    def _store_many(self, k, v, index, n_real):
        """Any number of tokens per row: writes exactly the real ones (reads their count on the host)."""
        B, _, n, _ = k.shape
        j = torch.arange(n, device=k.device)
        if n_real is None:
            n_real = torch.full((B,), n, dtype=torch.long, device=k.device)
        real = j < n_real.unsqueeze(1)  # (B, n)
        rows, cols = real.nonzero(as_tuple=True)
        slots = self.length[rows] + cols  # in range: the model refuses rows longer than max_seq_len
        self.k[rows, :, slots] = k[rows, :, cols]
        self.v[rows, :, slots] = v[rows, :, cols]
        self.positions[rows, slots] = index[rows, cols]

        query_slots = self.length.unsqueeze(1) + j  # (B, n)
        end = min(self.max_len, int(query_slots.max()) + 1)
        mask = self.slot_ids[:end] <= query_slots.unsqueeze(-1)  # (B, n, end)
        self.length += n_real
        return self.k[:, :, :end], self.v[:, :, :end], mask.unsqueeze(1)


class KVRecord:
    """The keys and values one block computed in a pass over whole sequences (no cache), with each
    key's original position (-1 for padding), kept for the later recursion steps that attend over
    them (recursive KV sharing, ``SharedKV``)."""

    reads = False

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None

    def record(self, k, v, index, n_real=None) -> None:
        """Keep keys/values (B, H, n, hd) of tokens at ``index`` (B, n), the first ``n_real`` real."""
        if n_real is not None:
            index = index.masked_fill(torch.arange(index.size(1), device=index.device) >= n_real.unsqueeze(1), -1)
        self.k, self.v, self.positions = k, v, index


class SharedKV:
    """Another pass's keys and values, read instead of computing any (recursive KV sharing: a later
    recursion step attends over the first step's). ``source`` is that step's block's ``KVRecord``
    (whole sequences) or ``KVCache`` (a prompt, a decoding step): both hold ``k``, ``v`` and the
    ``positions`` of their entries (-1: no token)."""

    reads = True

    def __init__(self, source):
        self.source = source

    def read(self, index, n_real=None, rows=None, span=None):
        """Keys, values and the boolean mask (B, 1, n, S) for queries at ``index`` (B, n): a query
        sees every entry at its own position or before; a query that is not real (past ``n_real``)
        sees every slot, so that its output, dropped later, stays finite."""
        k, v, positions = self.source.k, self.source.v, self.source.positions
        if span is not None:
            k, v, positions = k[:, :, :span], v[:, :, :span], positions[:, :span]
        if rows is not None:
            k, v, positions = k.index_select(0, rows), v.index_select(0, rows), positions.index_select(0, rows)
        keys = positions.unsqueeze(1)  # (B, 1, S)
        mask = (keys >= 0) & (keys <= index.unsqueeze(-1))  # (B, n, S)
        if n_real is not None:  # a query with no key at all gives NaN on some kernels (0 * NaN is NaN)
            padding = torch.arange(index.size(1), device=index.device) >= n_real.unsqueeze(1)
            mask = mask | padding.unsqueeze(-1)
        return k, v, mask.unsqueeze(1)


class StackCache:
    """The caches of a stack of blocks run as one unit (a recursion step: ``recursion.py``): one
    ``KVCache`` per block, in order, and the state of the causal decision of the router in front of
    it (what a routed block keeps on its own ``KVCache``)."""

    ROW_BUFFERS = ("processed",)
    """As ``KVCache.ROW_BUFFERS``."""

    def __init__(self, blocks: list[Optional[KVCache]], batch_size: int, decision=None, device=None):
        self.blocks = blocks
        """One ``KVCache`` per block of the stack (None where the step caches nothing: a later step
        under recursive KV sharing reads the first step's)."""
        self.decision = decision
        """As ``KVCache.decision``: the step's router's ``DecisionState`` (None without a router)."""
        self.processed = torch.zeros(batch_size, dtype=torch.long, device=device)
        """(B,) tokens of each row the step has processed (its caches' length, where it caches)."""

    def count(self, processed: torch.Tensor) -> None:
        """Add ``processed`` (B,) tokens to each row's count (in place)."""
        self.processed += processed.long()

    def reset(self) -> None:
        """Count nothing processed, in place (its block caches are reset as the state's holders)."""
        self.processed.zero_()


class DecodeState:
    """Everything a model carries from one decoding step to the next: the cache of every block,
    how many tokens each row has consumed, a bound on that count known to the host, and the rotary
    tables of every position (computed once, indexed per step). Made by ``MoDTransformer.new_state``."""

    ROW_BUFFERS = ("seen",)
    """As ``KVCache.ROW_BUFFERS``."""

    def __init__(self, caches: list, rope: tuple[torch.Tensor, torch.Tensor], batch_size: Optional[int] = None):
        self.caches = caches
        """One entry per entry of the model's ``blocks``, in depth order: a ``KVCache`` per block, a
        list of ``StackCache`` (one per recursion step) per recursion."""
        # batch_size None: the first entry is a KVCache and its rows say it
        rows = caches[0].length.numel() if batch_size is None else batch_size
        self.seen = torch.zeros(rows, dtype=torch.long, device=rope[0].device)
        """(B,) tokens each row has consumed (on the device)."""
        self.filled = 0
        """Tokens the longest row has consumed, known to the host without a sync: no block's cache
        holds more entries in any row, so a decoding step reads no further, and the model checks
        the context length against it."""
        self.cos, self.sin = rope

    def holders(self) -> Iterator:
        """Every object of the state that holds per-row tensors (``ROW_BUFFERS``): its caches, a
        recursion's step caches and theirs, their decision states, the state itself."""
        for entry in self.caches:
            for cache in entry if isinstance(entry, list) else [entry]:
                yield cache
                if cache.decision is not None:
                    yield cache.decision
                if isinstance(cache, StackCache):
                    yield from (block for block in cache.blocks if block is not None)
        yield self

    def reset(self) -> None:
        """Start every row afresh, in place: the state a new ``new_state`` would be, in the same tensors
        (a compiled decoding step, and the CUDA graphs it records, keep reading them)."""
        for holder in self.holders():
            if holder is not self:
                holder.reset()
        self.seen.zero_()
        self.filled = 0

    def mark_static(self) -> None:
        """Tell torch.compile that the state's tensors never move (``torch._dynamo.mark_static_address``):
        a compiled step then treats them as fixed addresses, as it does the model's parameters, so CUDA
        graphs may record a step that writes into them instead of falling back to running without
        graphs ("mutated inputs")."""
        for holder in self.holders():
            for tensor in vars(holder).values():
                if isinstance(tensor, torch.Tensor):
                    torch._dynamo.mark_static_address(tensor)
