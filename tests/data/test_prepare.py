"""The prepare command: it writes exactly the tokens the on-the-fly path would make, never overwrites,
and its command line takes the training run's defaults and flags."""

import json

import numpy as np
import pytest
import torch
import yaml

from modlm.cli import prepare as cli
from modlm.cli.prepare import main as prepare_main
from modlm.cli.prepare import parse
from modlm.data import DataError
from modlm.data.prepare import PrepareSettings
from modlm.model.errors import UserError
from tests.data.helpers import DATA_DEFAULTS, prepared_dm


def test_prepare_writes_the_tokens_of_every_document(corpus_folder, prepared):
    out, cache = prepared
    raw = prepared_dm(corpus_folder, cache)  # same settings: the same (cached) tokenizer
    meta = json.loads((out / "meta.json").read_text())
    assert (out / "tokenizer.json").read_text() == raw.tokenizer.to_str()
    assert all(n == 3000 for n in meta["train"]["tokens"][:-1]) and len(meta["train"]["files"]) > 3
    eot = raw.eot_id
    for split, texts in (("train", raw.corpus.train_texts()), ("val", raw.corpus.val_texts())):
        want = np.concatenate(
            [np.asarray(raw.tokenizer.encode(t, add_special_tokens=False).ids + [eot]) for t in texts]
        )
        got = np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta[split]["files"]])
        assert np.array_equal(got.astype(np.int64), want), split
    assert meta["documents"] == {"train": raw.corpus.num_train_docs, "val": raw.corpus.num_val_docs}
    # validation: the same windows as the on-the-fly path
    folder_dm = prepared_dm(out, cache)
    assert torch.equal(folder_dm.validation_windows, raw.validation_windows)
    assert folder_dm.tokenizer_vocab_size == raw.tokenizer_vocab_size


def test_prepare_never_overwrites(prepared, corpus_folder, capsys):
    out, _ = prepared
    before = (out / "meta.json").read_bytes()
    assert prepare_main([str(corpus_folder), str(out), "--no_progress"]) == 2
    assert "already exists; nothing overwritten" in capsys.readouterr().err
    assert (out / "meta.json").read_bytes() == before


def test_the_command_line_has_the_data_modules_defaults_and_the_same_flags():
    run = parse(["SRC", "OUT"])
    assert (run.source, run.out) == ("SRC", "OUT")
    shared = ("vocab_size", "tokenizer", "text_field", "val_fraction", "seed", "tokenizer_train_chars", "cache_dir")
    assert {name: getattr(run, name) for name in shared} == {name: DATA_DEFAULTS[name] for name in shared}
    assert run.settings().progress and not parse(["SRC", "OUT", "--no_progress"]).settings().progress
    flags = [
        "--vocab_size",
        "300",
        "--tokenizer",
        "t.json",
        "--text_field",
        "body",
        "--val_fraction",
        "0.1",
        "--seed",
        "3",
        "--tokenizer_train_chars",
        "99",
        "--cache_dir",
        "c",
        "--num_proc",
        "3",
        "--shard_tokens",
        "7",
    ]
    assert parse(["SRC", "OUT", *flags, "--no_progress"]).settings() == PrepareSettings(
        vocab_size=300,
        tokenizer="t.json",
        text_field="body",
        val_fraction=0.1,
        seed=3,
        tokenizer_train_chars=99,
        cache_dir="c",
        num_proc=3,
        shard_tokens=7,
        progress=False,
    )


def test_help_config_files_and_print_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        parse(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for text in (
        "--config",
        "--print_config",
        "--no_progress",
        "tokens per shard file",
        "tokenizing processes",
        "the prepared folder to write",
    ):
        assert text in shown, text
    config = tmp_path / "prepare.yaml"
    config.write_text("source: SRC\nout: OUT\nvocab_size: 300\nno_progress: true\n")
    run = parse(["--config", str(config)])
    assert (run.source, run.out, run.vocab_size, run.no_progress) == ("SRC", "OUT", 300, True)
    with pytest.raises(SystemExit) as done:
        parse(["SRC", "OUT", "--seed", "5", "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["vocab_size"] == DATA_DEFAULTS["vocab_size"] and printed["out"] == "OUT"
    with pytest.raises(UserError, match="out"):
        parse(["SRC"])  # OUT missing


def test_a_user_error_is_one_line_with_status_2_and_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    missing = [str(tmp_path / "missing"), str(tmp_path / "out"), "--no_progress"]
    assert prepare_main(missing) == 2
    err = capsys.readouterr().err
    assert err.startswith("modlm: error: data source") and "does not exist" in err and err.count("\n") == 1
    monkeypatch.setenv("MODLM_DEBUG", "1")
    with pytest.raises(DataError, match="does not exist"):
        prepare_main(missing)
    monkeypatch.delenv("MODLM_DEBUG")

    def fail(error):
        def prepare(*args):
            raise error

        return prepare

    monkeypatch.setattr(cli, "prepare_corpus", fail(UserError("not a data error\nsecond line")))
    assert prepare_main(["SRC", "OUT"]) == 2  # any UserError, not only the data layer's
    assert capsys.readouterr().err == "modlm: error: not a data error\n"
    monkeypatch.setattr(cli, "prepare_corpus", fail(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        prepare_main(["SRC", "OUT"])
