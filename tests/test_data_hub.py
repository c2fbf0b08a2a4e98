"""hub:NAME sources: fail fast offline; the streaming shard logic on a local stream."""
import itertools
import json
import time

import datasets
import pytest

from modlm.data import DataError, ModLMDataModule
from modlm.data.hub import HubCorpus, parse_hub_source


def test_offline_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    dm = ModLMDataModule(source="hub:roneneldan/TinyStories")
    with pytest.raises(DataError, match=r"hub:roneneldan/TinyStories.*unreachable.*--data.source PATH"):
        _ = dm.tokenizer_vocab_size
    assert time.monotonic() - start < 5


def test_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(DataError, match="unreachable"):
        HubCorpus("hub:some/dataset")
    assert time.monotonic() - start < 5


def test_parse_hub_source():
    assert parse_hub_source("hub:HuggingFaceFW/fineweb:sample-10BT") == ("HuggingFaceFW/fineweb", "sample-10BT")
    assert parse_hub_source("hub:roneneldan/TinyStories") == ("roneneldan/TinyStories", None)
    with pytest.raises(DataError, match="expected hub:NAME"):
        parse_hub_source("hub:")


def local_stream_corpus(tmp_path) -> HubCorpus:
    """A HubCorpus whose stream is a local streaming dataset of the same type `datasets`
    returns for the hub (2 files = 2 shards)."""
    files = []
    for f in range(2):
        path = tmp_path / f"part{f}.jsonl"
        path.write_text("\n".join(json.dumps({"text": f"story {f}-{i}"}) for i in range(40)))
        files.append(str(path))
    corpus = HubCorpus.__new__(HubCorpus)
    corpus.source, corpus.name, corpus.config = "hub:local", "local", None
    corpus.text_field, corpus.val_fraction, corpus.seed = "text", 0.2, 5
    corpus._stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    return corpus


def test_hub_stream_shards_partition_and_resume(tmp_path):
    corpus = local_stream_corpus(tmp_path)
    val = set(corpus.val_texts())
    train = set(corpus.train_texts())
    assert val and train and not val & train and len(val | train) == 80
    shards = [list(corpus.slot_docs(slot, 4, epoch=0)) for slot in range(4)]
    texts = [t for shard in shards for _, t in shard]
    assert sorted(texts) == sorted(train)  # disjoint and complete
    # Resuming a shard at a position gives the same remaining documents.
    pos = shards[1][3][0]
    assert list(corpus.slot_docs(1, 4, 0, start=pos)) == shards[1][3:]
    # Another epoch, another order.
    assert [t for _, t in corpus.slot_docs(0, 1, 1)] != [t for _, t in corpus.slot_docs(0, 1, 0)]
    assert list(itertools.islice(corpus.slot_docs(0, 1, 1), 5)) == list(itertools.islice(corpus.slot_docs(0, 1, 1), 5))


def test_missing_text_column_is_named_on_every_path(tmp_path):
    corpus = local_stream_corpus(tmp_path)
    corpus.text_field = "body"
    for read in (lambda: next(corpus.train_texts()), lambda: next(corpus.slot_docs(0, 2, epoch=0))):
        with pytest.raises(DataError, match="no 'body' column"):
            read()
