"""The token stream: every window once an epoch whatever the layout, batches that are exactly the
prepared folder's windows, and a resume on any number of ranks/workers."""

import itertools
import json

import numpy as np
import torch

from modlm.data.order import permute
from modlm.data.stream.tokens import TokenStream
from tests.data.helpers import BATCH, SEQ, prepared_dm


def token_stream(corpus, rank=0, world_size=1, num_workers=0, consumed=0) -> TokenStream:
    """A rank's token stream of the prepared folder's windows (one process unless told)."""
    return TokenStream(
        corpus, SEQ, BATCH, seed=7, rank=rank, world_size=world_size, num_workers=num_workers, consumed=consumed
    )


def test_an_epoch_visits_every_window_once_on_any_layout(prepared):
    out, cache = prepared
    corpus = prepared_dm(out, cache).corpus
    per_epoch = corpus.num_train_tokens // (SEQ + 1)
    for world, workers in ((1, 0), (2, 2), (3, 1)):
        streams = [token_stream(corpus, rank=r, world_size=world, num_workers=workers) for r in range(world)]
        steps = -(-per_epoch // (world * BATCH))
        ids = np.concatenate([s.window_ids(b) for b in range(steps) for s in streams])
        first = ids[:per_epoch]
        assert sorted(first.tolist()) == list(range(per_epoch)), (world, workers)
        # the global order is the same permutation whatever the layout
        single = token_stream(corpus)
        assert np.array_equal(
            first[: BATCH * world * 2], np.concatenate([single.window_ids(b) for b in range(2 * world)])
        )


def test_batches_are_the_windows_and_do_not_depend_on_workers(prepared):
    out, cache = prepared
    dm0, dm2 = prepared_dm(out, cache, num_workers=0), prepared_dm(out, cache, num_workers=2)
    got0 = list(itertools.islice(dm0.train_dataloader(), 7))
    got2 = list(itertools.islice(dm2.train_dataloader(), 7))
    assert all(torch.equal(a, b) for a, b in zip(got0, got2))
    stream = dm0.train_dataloader().dataset
    tokens = np.concatenate([np.fromfile(out / f, dtype="<u2") for f in dm0.corpus.meta["train"]["files"]])
    for b, batch in enumerate(got0):
        assert batch.shape == (BATCH, SEQ + 1) and batch.dtype == torch.long
        for row, w in zip(batch, stream.window_ids(b)):
            assert np.array_equal(row.numpy(), tokens[w * (SEQ + 1) : (w + 1) * (SEQ + 1)])


def test_resume_is_exact_and_layout_free(prepared):
    out, cache = prepared
    full = list(itertools.islice(prepared_dm(out, cache, num_workers=2).train_dataloader(), 9))
    first = prepared_dm(out, cache, num_workers=2)
    it = iter(first.train_dataloader())
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state == {"train": {"consumed": 5 * BATCH, "seq_len": SEQ, "tokens": 5 * BATCH * (SEQ + 1)}}
    for workers in (2, 0, 3):  # the same layout, and others: the same next batches on one rank
        again = prepared_dm(out, cache, num_workers=workers)
        again.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint round trip
        rest = list(itertools.islice(again.train_dataloader(), 4))
        assert all(torch.equal(a, b) for a, b in zip(rest, full[5:])), workers
    # Two ranks resumed from one rank's position: together they continue the same window order.
    corpus = first.corpus
    ranks = [token_stream(corpus, rank=r, world_size=2, consumed=5 * BATCH) for r in range(2)]
    single = token_stream(corpus)
    assert np.array_equal(
        np.concatenate([ranks[0].window_ids(0), ranks[1].window_ids(0)]),
        np.concatenate([single.window_ids(5), single.window_ids(6)]),
    )


def test_windows_follow_the_permutation_of_each_epochs_seed(prepared):
    out, cache = prepared
    corpus = prepared_dm(out, cache).corpus
    seed = 10**7 + 3  # large enough that a 32-bit seed would be another one
    stream = TokenStream(corpus, SEQ, BATCH, seed=seed, rank=0, world_size=1, num_workers=0)
    n = stream.windows_per_epoch
    batch = n // BATCH  # the first batch that reaches into epoch 1
    k = batch * BATCH + np.arange(BATCH)
    want = [permute(np.array([i % n]), n, key=seed * 1_000_003 + int(i) // n)[0] for i in k]
    assert stream.window_ids(batch).tolist() == want and k[-1] // n == 1
