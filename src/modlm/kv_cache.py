"""Key/value cache for incremental decoding, one per block, with a length per row.

Rows fill at different rates: prompts have different lengths, and a routed block only stores the
tokens its causal decision processed (that is where MoD's decode speed comes from: a skipped token
costs that block nothing and leaves no entry). So each row keeps its own length, and every entry
remembers the original position of its token (keys are stored already rotated by RoPE at that
position).

New entries arrive as a (B, H, n, hd) batch whose first ``n_valid[b]`` entries of row b are real and
the rest padding (the callers pack real tokens first, in temporal order). Only real entries are
written; padding is never stored.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size: int, capacity: int):
        self.capacity = capacity
        self.length = torch.zeros(batch_size, dtype=torch.long)
        self.k = self.v = self.positions = None  # allocated on first use, in the keys' dtype/device

    def _allocate(self, k: torch.Tensor) -> None:
        B, H, _, hd = k.shape
        # Zeros, not empty: padding queries may look at unwritten slots; they must stay finite.
        self.k = k.new_zeros(B, H, self.capacity, hd)
        self.v = k.new_zeros(B, H, self.capacity, hd)
        self.positions = torch.full((B, self.capacity), -1, dtype=torch.long, device=k.device)
        self.length = self.length.to(k.device)

    def append(self, k, v, n_valid, positions):
        """Store the real entries; return all keys, values and the attention mask for the new queries.

        ``positions`` (B, n) are the tokens' original positions. Query j of row b sees the cached
        entries of that row and the new ones up to itself: slots ``< length[b] + j + 1``.
        """
        if self.k is None:
            self._allocate(k)
        B, _, n, _ = k.shape
        j = torch.arange(n, device=k.device)
        rows, cols = (j < n_valid.unsqueeze(1)).nonzero(as_tuple=True)
        slots = self.length[rows] + cols  # in range: the model refuses rows longer than max_seq_len
        self.k[rows, :, slots] = k[rows, :, cols]
        self.v[rows, :, slots] = v[rows, :, cols]
        self.positions[rows, slots] = positions[rows, cols]

        query_slots = self.length.unsqueeze(1) + j  # (B, n)
        end = min(self.capacity, int(query_slots.max()) + 1)
        mask = torch.arange(end, device=k.device) <= query_slots.unsqueeze(-1)  # (B, n, end)
        self.length = self.length + n_valid
        return self.k[:, :, :end], self.v[:, :, :end], mask.unsqueeze(1)


class ModelCache:
    """The caches of every block of a model, plus how many tokens each row has consumed."""

    def __init__(self, n_layers: int, batch_size: int, capacity: int, device=None):
        self.blocks = [KVCache(batch_size, capacity) for _ in range(n_layers)]
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
