"""The two training streams behind one interface: each starts where it is told, leaves itself as it
was, saves its position and continues exactly from a saved one."""

import itertools
import json

import pytest
import torch

from modlm.data import DataError
from modlm.data.stream.base import StreamPosition
from modlm.data.stream.loader import ResumableLoader
from tests.data.helpers import prepared_dm


@pytest.fixture(params=["text", "tokens"])
def source(request, corpus_folder, prepared):
    """(source, tokenizer cache): the small corpus as text, or the folder prepared from it."""
    out, cache = prepared
    return (corpus_folder if request.param == "text" else out), cache


def rank_stream(dm, num_workers: int = 0):
    return dm.corpus.train_stream(
        dm.tokenizer, seq_len=dm.seq_len, batch_size=dm.batch_size, rank=0, world_size=1, num_workers=num_workers
    )


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_saved_position_continues_exactly(source, num_workers):
    folder, cache = source
    dm = prepared_dm(folder, cache, num_workers=num_workers)
    n, k = 12, 5
    straight = list(itertools.islice(ResumableLoader(rank_stream(dm, num_workers), num_workers), n))
    first = ResumableLoader(rank_stream(dm, num_workers), num_workers)
    head = list(itertools.islice(first, k))
    saved = json.loads(json.dumps(first.saved_state()))  # what a checkpoint holds
    again = ResumableLoader(rank_stream(dm, num_workers), num_workers)
    again.restore(saved)
    assert same(head + list(itertools.islice(again, n - k)), straight)


def test_starting_at_a_position_leaves_the_stream_as_it_was(source):
    folder, cache = source
    stream = rank_stream(prepared_dm(folder, cache))
    straight = [b for b, _, _ in itertools.islice(stream, 8)]
    position = stream.initial_position()
    for _, worker, place in itertools.islice(stream, 3):
        position = position.after(worker, place, stream.logical_workers)
    assert position.batches == 3
    later = stream.starting_at(StreamPosition.from_dict(json.loads(json.dumps(position.to_dict()))))
    assert same([b for b, _, _ in itertools.islice(later, 5)], straight[3:])
    assert same([b for b, _, _ in itertools.islice(stream, 8)], straight)  # still from the beginning


def test_each_kind_refuses_the_others_state(corpus_folder, prepared):
    out, cache = prepared
    text, tokens = (rank_stream(prepared_dm(s, cache)) for s in (corpus_folder, out))
    for stream, other in ((text, tokens), (tokens, text)):
        with pytest.raises(DataError, match="another kind of source"):
            stream.restore(other.save(other.initial_position()))
