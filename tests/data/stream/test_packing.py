"""Packing: every token of the documents lands in exactly one window, and positions resume."""

import numpy as np

from modlm.data.stream.packing import pack_windows


def test_pack_windows_keeps_every_token_once():
    docs = [np.arange(n, dtype=np.int64) + 100 * i for i, n in enumerate([5, 1, 12, 3, 7, 9])]
    stream = ((0, i, d, 0) for i, d in enumerate(docs))
    out = list(pack_windows(stream, window=4))
    flat = np.concatenate(docs)
    assert [len(w) for w, _ in out] == [4] * (len(flat) // 4)
    assert np.array_equal(np.concatenate([w for w, _ in out]), flat[: 4 * len(out)])
    # Positions point at the first token not emitted: doc 2 token 2 after 8 tokens (5 + 1 + 2).
    assert out[1][1] == {"epoch": 0, "pos": 2, "offset": 2}


def test_the_position_after_a_window_is_enough_to_resume():
    docs = [np.arange(n, dtype=np.int64) + 100 * i for i, n in enumerate([5, 1, 12, 3, 7, 9, 2])]
    full = list(pack_windows(((0, i, d, 0) for i, d in enumerate(docs)), window=4))
    for k, (_, place) in enumerate(full):
        pos, offset = place["pos"], place["offset"]
        rest = (
            (0, i, d[offset:] if i == pos else d, offset if i == pos else 0) for i, d in enumerate(docs) if i >= pos
        )
        again = list(pack_windows(rest, window=4))
        assert len(again) == len(full) - k - 1
        assert all(np.array_equal(a, b) and pa == pb for (a, pa), (b, pb) in zip(again, full[k + 1 :]))
