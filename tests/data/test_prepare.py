"""The prepare command: it writes exactly the tokens the on-the-fly path would make, never overwrites,
and its command line takes the training run's defaults and flags."""
import json

import numpy as np
import torch

from modlm.cli.prepare import main as prepare_main
from tests.data.helpers import prepared_dm


def test_prepare_writes_the_tokens_of_every_document(corpus_folder, prepared):
    out, cache = prepared
    raw = prepared_dm(corpus_folder, cache)  # same settings: the same (cached) tokenizer
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
    shard_dm = prepared_dm(out, cache)
    assert torch.equal(shard_dm._val_windows_all, raw._val_windows_all)
    assert shard_dm.tokenizer_vocab_size == raw.tokenizer_vocab_size


def test_prepare_never_overwrites(prepared, corpus_folder, capsys):
    out, _ = prepared
    before = (out / "meta.json").read_bytes()
    assert prepare_main([str(corpus_folder), str(out), "--no_progress"]) == 2
    assert "already exists; nothing overwritten" in capsys.readouterr().err
    assert (out / "meta.json").read_bytes() == before
