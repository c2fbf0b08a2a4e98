"""Prepared token shards: prepare writes exactly the tokens the on-the-fly path would make, the stream
visits every window once an epoch whatever the layout, and resumes on any number of ranks/workers."""
import itertools
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from modlm.data import DataError, ModLMDataModule
from modlm.data.shard_writer import prepare_corpus
from modlm.data.shards import ShardStream, permute
from modlm.cli.prepare import main as prepare_main

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["bisect.py", "colorsys.py", "keyword.py", "this.py", "struct.py", "token.py", "stat.py", "abc.py",
         "copy.py", "glob.py", "heapq.py", "queue.py", "string.py", "fnmatch.py"]
SEQ, BATCH = 32, 4
SETTINGS = dict(vocab_size=400, tokenizer_train_chars=50_000, val_fraction=0.2, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in FILES:
        shutil.copy(STDLIB / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("prep") / "tokens"
    prepare_corpus(str(corpus), out, tokenizer_path=None, text_field="text", cache_dir=str(cache), num_proc=2,
                   shard_tokens=3000, progress=False, **SETTINGS)
    return out, cache


def dm_for(source, cache, **kw) -> ModLMDataModule:
    args = dict(source=str(source), seq_len=SEQ, batch_size=BATCH, val_windows=6, num_workers=0,
                cache_dir=str(cache), **SETTINGS)
    return ModLMDataModule(**{**args, **kw})


def test_prepare_writes_the_tokens_of_every_document(corpus, prepared):
    out, cache = prepared
    raw = dm_for(corpus, cache)  # same settings: the same (cached) tokenizer
    meta = json.loads((out / "meta.json").read_text())
    assert (out / "tokenizer.json").read_text() == raw.tokenizer.to_str()
    assert all(n == 3000 for n in meta["train"]["tokens"][:-1]) and len(meta["train"]["files"]) > 3
    eot = raw.eot_id
    for split, texts in (("train", raw.corpus.train_texts()), ("val", raw.corpus.val_texts())):
        want = np.concatenate([np.asarray(raw.tokenizer.encode(t, add_special_tokens=False).ids + [eot]) for t in texts])
        got = np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta[split]["files"]])
        assert np.array_equal(got.astype(np.int64), want), split
    assert meta["documents"] == {"train": raw.corpus.num_train_docs, "val": raw.corpus.num_val_docs}
    # validation: the same windows as the on-the-fly path
    shard_dm = dm_for(out, cache)
    assert torch.equal(shard_dm._val_windows_all, raw._val_windows_all)
    assert shard_dm.tokenizer_vocab_size == raw.tokenizer_vocab_size


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4099])
def test_permute_is_a_permutation(n):
    out = permute(np.arange(n), n, key=11)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(out, np.arange(n)) and not np.array_equal(out, permute(np.arange(n), n, key=12))


def test_an_epoch_visits_every_window_once_on_any_layout(prepared):
    out, cache = prepared
    corpus = dm_for(out, cache).corpus
    per_epoch = corpus.num_train_tokens // (SEQ + 1)
    for world, workers in ((1, 0), (2, 2), (3, 1)):
        streams = [ShardStream(corpus, SEQ, BATCH, seed=7, rank=r, world_size=world, num_workers=workers) for r in range(world)]
        steps = -(-per_epoch // (world * BATCH))
        ids = np.concatenate([s.window_ids(b) for b in range(steps) for s in streams])
        first = ids[:per_epoch]
        assert sorted(first.tolist()) == list(range(per_epoch)), (world, workers)
        # the global order is the same permutation whatever the layout
        single = ShardStream(corpus, SEQ, BATCH, seed=7)
        assert np.array_equal(first[: BATCH * world * 2], np.concatenate([single.window_ids(b) for b in range(2 * world)]))


def test_batches_are_the_windows_and_do_not_depend_on_workers(prepared):
    out, cache = prepared
    dm0, dm2 = dm_for(out, cache, num_workers=0), dm_for(out, cache, num_workers=2)
    got0 = list(itertools.islice(dm0.train_dataloader(), 7))
    got2 = list(itertools.islice(dm2.train_dataloader(), 7))
    assert all(torch.equal(a, b) for a, b in zip(got0, got2))
    stream = dm0.train_dataloader().dataset
    tokens = np.concatenate([np.fromfile(out / f, dtype="<u2") for f in dm0.corpus.meta["train"]["files"]])
    for b, batch in enumerate(got0):
        assert batch.shape == (BATCH, SEQ + 1) and batch.dtype == torch.long
        for row, w in zip(batch, stream.window_ids(b)):
            assert np.array_equal(row.numpy(), tokens[w * (SEQ + 1):(w + 1) * (SEQ + 1)])


def test_resume_is_exact_and_layout_free(prepared):
    out, cache = prepared
    full = list(itertools.islice(dm_for(out, cache, num_workers=2).train_dataloader(), 9))
    first = dm_for(out, cache, num_workers=2)
    it = iter(first.train_dataloader())
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state == {"train": {"consumed": 5 * BATCH, "seq_len": SEQ, "tokens": 5 * BATCH * (SEQ + 1)}}
    for workers in (2, 0, 3):  # the same layout, and others: the same next batches on one rank
        again = dm_for(out, cache, num_workers=workers)
        again.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint round trip
        rest = list(itertools.islice(again.train_dataloader(), 4))
        assert all(torch.equal(a, b) for a, b in zip(rest, full[5:])), workers
    # Two ranks resumed from one rank's position: together they continue the same window order.
    corpus = first.corpus
    ranks = [ShardStream(corpus, SEQ, BATCH, seed=7, rank=r, world_size=2, consumed=5 * BATCH) for r in range(2)]
    single = ShardStream(corpus, SEQ, BATCH, seed=7)
    assert np.array_equal(np.concatenate([ranks[0].window_ids(0), ranks[1].window_ids(0)]),
                          np.concatenate([single.window_ids(5), single.window_ids(6)]))


def test_bad_prepared_folders_are_one_line_errors(prepared, tmp_path, corpus, capsys):
    out, cache = prepared
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "train-00001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="train-00001.bin is 10 bytes"):
        dm_for(broken, cache).corpus
    (broken / "meta.json").unlink()
    with pytest.raises(DataError, match="half-written"):
        dm_for(broken, cache).corpus
    other = tmp_path / "other_tokenizer.json"
    other.write_text(dm_for(corpus, cache, vocab_size=300).tokenizer.to_str())
    with pytest.raises(DataError, match="another tokenizer"):
        dm_for(out, cache, tokenizer_path=str(other)).tokenizer
    before = (out / "meta.json").read_bytes()
    assert prepare_main([str(corpus), str(out), "--no_progress"]) == 2
    assert "already exists; nothing overwritten" in capsys.readouterr().err
    assert (out / "meta.json").read_bytes() == before
