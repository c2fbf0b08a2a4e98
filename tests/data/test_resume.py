"""The data module's checkpointed state: the formats checkpoints hold (so that existing ones resume),
a resume on another layout or window length, and a checkpoint of another kind of source."""

import itertools

import pytest
import torch

from modlm.data import DataError, DataWarning
from tests.data.helpers import BATCH, SEQ, prepared_dm


def epoch_reached(state) -> int:
    return min(w["epoch"] for r in state["train"]["ranks"] for w in r["workers"])


def test_a_text_state_holds_every_ranks_position_with_its_layout(corpus_folder, prepared):
    _, cache = prepared
    dm = prepared_dm(corpus_folder, cache, num_workers=2)
    list(itertools.islice(dm.train_dataloader(), 6))
    state = dm.state_dict()
    assert list(state) == ["train"] and list(state["train"]) == ["ranks"]  # no pins for local files
    (rank,) = state["train"]["ranks"]
    assert rank.keys() == {
        "workers",
        "next_worker",
        "batches",
        "rank",
        "world_size",
        "num_workers",
        "seq_len",
        "batch_size",
    }
    assert [
        rank[k] for k in ("batches", "next_worker", "rank", "world_size", "num_workers", "seq_len", "batch_size")
    ] == [6, 0, 0, 1, 2, SEQ, BATCH]
    assert len(rank["workers"]) == 2 and all(w.keys() == {"epoch", "pos", "offset"} for w in rank["workers"])


def test_a_text_position_of_another_layout_restarts_the_epoch_it_reached(corpus_folder, prepared):
    _, cache = prepared
    first = prepared_dm(corpus_folder, cache, num_workers=2)
    it = iter(first.train_dataloader())
    while epoch_reached(first.state_dict()) < 1:
        next(it)
    state = first.state_dict()
    epoch = epoch_reached(state)
    again = prepared_dm(corpus_folder, cache, num_workers=0)
    again.load_state_dict(state)
    with pytest.warns(
        DataWarning,
        match=rf"1 rank\(s\) x 2 worker\(s\), this run has 1 x 1: restarting the data "
        rf"stream at epoch {epoch}",
    ):
        loader = again.train_dataloader()
    start = {"epoch": epoch, "pos": 0, "offset": 0}
    assert loader.position().workers == [start]
    want = [b for b, _, _ in itertools.islice(loader.dataset.batches(0, start), 3)]
    assert all(torch.equal(a, b) for a, b in zip(itertools.islice(loader, 3), want))


def test_a_token_position_of_other_windows_continues_after_as_many_tokens(prepared):
    out, cache = prepared
    first = prepared_dm(out, cache)
    list(itertools.islice(first.train_dataloader(), 5))
    state = first.state_dict()
    tokens = 5 * BATCH * (SEQ + 1)
    assert state == {"train": {"consumed": 5 * BATCH, "seq_len": SEQ, "tokens": tokens}}
    again = prepared_dm(out, cache, seq_len=16)
    again.load_state_dict(state)
    with pytest.warns(
        DataWarning,
        match=rf"seq_len {SEQ}, this run 16: continuing after the same number of tokens "
        rf"\({tokens:,}\)",
    ):
        again.train_dataloader()
    assert again.state_dict() == {"train": {"consumed": tokens // 17, "seq_len": 16, "tokens": tokens // 17 * 17}}


def test_a_checkpoint_of_another_kind_of_source_is_refused(corpus_folder, prepared):
    out, cache = prepared
    states = {}
    for kind, source in (("text", corpus_folder), ("tokens", out)):
        dm = prepared_dm(source, cache)
        next(iter(dm.train_dataloader()))
        states[kind] = dm.state_dict()
    for kind, source in (("tokens", corpus_folder), ("text", out)):
        dm = prepared_dm(source, cache)
        dm.load_state_dict(states[kind])
        with pytest.raises(DataError, match="another kind of source"):
            dm.train_dataloader()


def test_a_state_loaded_before_training_is_saved_as_loaded(prepared):
    out, cache = prepared
    state = {"train": {"consumed": 8, "seq_len": SEQ, "tokens": 8 * (SEQ + 1)}}
    dm = prepared_dm(out, cache)
    dm.load_state_dict(state)
    assert dm.state_dict() == state  # a checkpoint saved before the first batch keeps the position
    dm.train_dataloader()
    assert dm.state_dict() == state
