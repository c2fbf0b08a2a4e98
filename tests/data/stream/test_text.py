"""The text stream: parts over ranks x workers, epochs, resume and validation windows."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modlm.data import DataError, ModLMDataModule
from modlm.data.stream.text import TextStream
from tests.data.helpers import copy_stdlib

SEQ, BATCH = 64, 8


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = copy_stdlib(tmp_path_factory.mktemp("corpus"))
    # Many small records in one file: parts must split inside files too.
    (folder / "records.jsonl").write_text(
        "\n".join(json.dumps({"text": f"record {i}: " + "ab" * (i % 7)}) for i in range(60))
    )
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make_dm(corpus_dir, cache_dir, **kw) -> ModLMDataModule:
    args = dict(
        source=str(corpus_dir),
        seq_len=SEQ,
        batch_size=BATCH,
        vocab_size=400,
        tokenizer_train_chars=50_000,
        val_fraction=0.2,
        val_windows=10,
        num_workers=2,
        seed=7,
        cache_dir=str(cache_dir),
    )
    return ModLMDataModule(**{**args, **kw})


def test_train_batches_have_fixed_shape(corpus_dir, cache_dir):
    dm = make_dm(corpus_dir, cache_dir, num_workers=0)
    batches = list(itertools.islice(dm.train_dataloader(), 30))  # several epochs of this corpus
    assert all(b.shape == (BATCH, SEQ + 1) and b.dtype == torch.long for b in batches)
    assert dm.state_dict()["train"]["ranks"][0]["workers"][0]["epoch"] >= 1


def epoch0(ds, worker):
    """(positions, token stream) of a worker's part in epoch 0."""
    docs = list(itertools.takewhile(lambda d: d[0] == 0, ds.docs(worker, ds.initial_position().workers[worker])))
    return [d[1] for d in docs], np.concatenate([d[2] for d in docs])


def expected_owners(corpus, num_parts, epoch):
    """Part of each training position: each file's documents cut into min(n, parts) blocks of
    n // m or n // m + 1, block j to part (first position + j) % parts."""
    owners, first = [], 0
    for e in corpus.epoch_order(epoch):
        n = e.n_train
        m = min(n, num_parts)
        for j in range(m):
            owners += [(first + j) % num_parts] * ((j + 1) * n // m - j * n // m)
        first += n
    return owners


def test_two_ranks_two_workers_see_every_token_once(corpus_dir, cache_dir):
    dm = make_dm(corpus_dir, cache_dir)
    corpus, tok_json = dm.corpus, dm.tokenizer.to_str()
    owners = expected_owners(corpus, 4, 0)
    assert len(owners) == corpus.num_train_docs
    all_positions, all_tokens = [], []
    for rank in range(2):
        ds = TextStream(corpus, tok_json, SEQ, BATCH, rank=rank, world_size=2, num_workers=2)
        for worker in range(2):
            positions, tokens = epoch0(ds, worker)
            assert positions == sorted(positions)  # a part reads its blocks in order
            assert all(owners[p] == rank * 2 + worker for p in positions)
            all_positions += positions
            all_tokens.append(tokens)
            # The packed windows of this part are exactly its token stream, in order.
            rows = []
            for batch, w, pos in ds.batches(worker, ds.initial_position().workers[worker]):
                assert w == worker
                rows.append(batch.reshape(-1))
                if pos["epoch"] > 0:
                    break
            assert torch.equal(torch.cat(rows)[: len(tokens)], torch.from_numpy(tokens))
    # No document twice, none lost: positions of the 4 parts partition the epoch.
    assert sorted(all_positions) == list(range(corpus.num_train_docs))
    # Same multiset of tokens as the whole training split read by a single part.
    single = TextStream(corpus, tok_json, SEQ, BATCH, rank=0, world_size=1, num_workers=0)
    _, whole = epoch0(single, 0)
    assert np.array_equal(np.sort(np.concatenate(all_tokens)), np.sort(whole))


def test_epochs_reshuffle_with_seed(corpus_dir, cache_dir):
    corpus = make_dm(corpus_dir, cache_dir).corpus
    orders = [[e.relpath for e in corpus.epoch_order(e)] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[1])
    again = make_dm(corpus_dir, cache_dir).corpus
    assert [e.relpath for e in again.epoch_order(1)] == orders[1]
    other_seed = make_dm(corpus_dir, cache_dir, seed=8).corpus
    assert [e.relpath for e in other_seed.epoch_order(0)] != orders[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(corpus_dir, cache_dir, num_workers):
    n, k = 30, 11  # 30 batches cross an epoch boundary of this corpus
    straight = list(itertools.islice(make_dm(corpus_dir, cache_dir, num_workers=num_workers).train_dataloader(), n))

    first = make_dm(corpus_dir, cache_dir, num_workers=num_workers)
    head = list(itertools.islice(first.train_dataloader(), k))
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    assert state["train"]["ranks"][0]["batches"] == k

    second = make_dm(corpus_dir, cache_dir, num_workers=num_workers)
    second.load_state_dict(state)
    tail = list(itertools.islice(second.train_dataloader(), n - k))
    assert all(torch.equal(a, b) for a, b in zip(straight, head + tail))
    assert max(w["epoch"] for w in second.state_dict()["train"]["ranks"][0]["workers"]) >= 1

    # Iterating the same loader again also continues (no repeats) after a partial pass.
    loader = make_dm(corpus_dir, cache_dir, num_workers=num_workers).train_dataloader()
    again = list(itertools.islice(loader, k)) + list(itertools.islice(loader, n - k))
    assert all(torch.equal(a, b) for a, b in zip(straight, again))


def test_validation_windows_fixed_and_split_over_ranks(corpus_dir, cache_dir, monkeypatch):
    dm = make_dm(corpus_dir, cache_dir)
    dm.setup("fit")
    first = list(dm.val_dataloader())
    assert [b.shape for b in first] == [(8, SEQ + 1), (2, SEQ + 1)]
    assert all(torch.equal(a, b) for a, b in zip(first, dm.val_dataloader()))
    assert all(torch.equal(a, b) for a, b in zip(first, make_dm(corpus_dir, cache_dir).val_dataloader()))
    windows = torch.cat(first)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(ModLMDataModule, "_rank_world", lambda self, r=rank: (r, 2))
        shares.append(torch.cat(list(dm.val_dataloader())))
    assert len(shares[0]) == len(shares[1]) == 5
    assert torch.equal(torch.cat(shares).sort(0).values, windows.sort(0).values)
    # Validation tokens never come from training documents.
    train_texts = {t for _, t in dm.corpus.part_docs(0, 1, 0)}
    assert not train_texts & set(dm.corpus.val_texts())


def test_too_many_parts_and_bad_args(corpus_dir, cache_dir, tmp_path):
    folder = copy_stdlib(tmp_path / "two", ["copy.py", "glob.py", "heapq.py"])
    dm = make_dm(folder, cache_dir, val_fraction=0.0, num_workers=4)
    with pytest.raises(DataError, match="cannot be shared by 1 rank"):
        dm.train_dataloader()
    with pytest.raises(DataError, match="seq_len=0"):
        make_dm(corpus_dir, cache_dir, seq_len=0)
    with pytest.raises(DataError, match="val_fraction=1.5"):
        make_dm(corpus_dir, cache_dir, val_fraction=1.5)
