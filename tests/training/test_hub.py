"""Hub pushes carry the model, its tokenizer and a model card; every reader takes a Hub id (offline,
from the local Hugging Face cache); a pretrained tokenizer (a folder or a Hub id) trains a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modlm.cli.eval import main as eval_main
from modlm.cli.generate import main as generate_main
from modlm.cli.train import main as train_main
from modlm.data.tokenizer import end_of_text, fingerprint
from modlm.saved import load_saved
from tests.helpers import tiny_args
from tests.helpers.fake_hub import fake_hub
from tests.helpers.pretrained import cache_repo

pytestmark = pytest.mark.slow  # each test trains a run or a model from a pretrained tokenizer

EVAL_FLAGS = ["--quiet", "--decode_tokens", "2", "--prompt_tokens", "2"]
GREEDY = ["--max_new_tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("hub")
    assert train_main(["fit", *tiny_args(root, tiny_tokenizer, "--trainer.max_steps", "4")]) == 0
    return root / "checkpoints" / "last.ckpt"


def test_push_to_hub_carries_weights_tokenizer_code_and_a_model_card(checkpoint, monkeypatch, capsys):
    with fake_hub(monkeypatch) as hub:
        assert eval_main([str(checkpoint), "--push_to_hub", "someone/tiny-mod", *EVAL_FLAGS]) == 0
    files = hub.files["someone/tiny-mod"]
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "data.json",
        "modeling_modlm.py",
        "configuration_modlm.py",
        "transformer.py",
    } <= set(files)
    saved = load_saved(str(checkpoint))
    assert files["tokenizer.json"].decode() == saved.tokenizer.to_str()
    card = files["README.md"].decode()
    assert "mixture-of-depths" in card and "routed at capacity 0.25" in card and "training steps | 4" in card
    assert "validation loss (causal routing)" in card and "training tokens" in card, card


def test_readers_take_a_hub_id_from_the_local_cache_offline(checkpoint, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    with fake_hub(monkeypatch) as hub:
        assert eval_main([str(checkpoint), "--push_to_hub", "someone/tiny-mod", *EVAL_FLAGS]) == 0
    capsys.readouterr()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cache_repo(tmp_path / "hf", "someone/tiny-mod", hub.files["someone/tiny-mod"])
    want = generate_main([str(checkpoint), "def f(", *GREEDY]), capsys.readouterr().out
    for spec in ("someone/tiny-mod", "hub:someone/tiny-mod"):
        assert (generate_main([spec, "def f(", *GREEDY]), capsys.readouterr().out) == want, spec
    assert eval_main(["hub:someone/tiny-mod", *EVAL_FLAGS]) == 0  # an export: on its training corpus
    code = generate_main(["nobody/not-cached", "x"])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_model_push_to_hub_carries_its_tokenizer(checkpoint, monkeypatch):
    saved = load_saved(str(checkpoint))
    with fake_hub(monkeypatch) as hub:
        saved.model.push_to_hub("someone/plain")
    files = hub.files["someone/plain"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert files["tokenizer.json"].decode() == saved.tokenizer.to_str()


def pretrained_tokenizer_folder(folder: Path, corpus: str) -> Path:
    """A tokenizer folder as transformers writes one (tokenizer.json + tokenizer_config.json), made
    here: a byte-level BPE whose end-of-text token is ``</s>``, with no ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((p.read_text() for p in sorted(Path(corpus).glob("*.py"))[:20]), trainer=trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return folder


def test_a_pretrained_tokenizer_sets_the_vocabulary_and_the_end_of_text(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from huggingface_hub import constants

    folder = pretrained_tokenizer_folder(tmp_path / "tok", tiny_tokenizer[0])
    args = [
        a if a != tiny_tokenizer[1] else str(folder)
        for a in tiny_args(tmp_path / "run", tiny_tokenizer, "--trainer.max_steps", "2")
    ]
    assert train_main(["fit", *args]) == 0
    saved = load_saved(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert saved.model.config.vocab_size == 400 == saved.tokenizer.get_vocab_size()
    assert end_of_text(saved.tokenizer) == "</s>"
    from modlm.data.tokenizer import encode_documents

    eot = saved.tokenizer.token_to_id("</s>")  # documents are separated by the tokenizer's own token
    assert [ids[-1] for ids in encode_documents(saved.tokenizer, ["import os", "x = 1"])] == [eot, eot]
    # the same tokenizer from the Hub (the local cache, offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cache_repo(tmp_path / "hf", "someone/tok", {p.name: p.read_bytes() for p in folder.iterdir()})
    args = [a if a != str(folder) else "hub:someone/tok" for a in args]
    args[args.index("--trainer.default_root_dir") + 1] = str(tmp_path / "run2")
    assert train_main(["fit", *args]) == 0
    again = load_saved(str(tmp_path / "run2" / "checkpoints" / "last.ckpt"))
    assert fingerprint(again.tokenizer) == fingerprint(saved.tokenizer)
    assert torch.equal(again.validation_windows, saved.validation_windows)
