"""Chat data through the data module: a jsonl file of conversations (or prompt/completion pairs) read one
conversation per window, the loss mask on the answers, a held-out file, exact resume, a hub dataset of
conversations, and bad input refused naming its line or counted and reported."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.data import DataError, DataWarning, ModLMDataModule
from modlm.data.chat import ChatEncoder
from modlm.model.config import IGNORE_INDEX
from tests.helpers.chat import CONVERSATION, as_messages, docstring_pairs, write_chats

SEQ, BATCH = 128, 4


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    """Question/answer pairs that fit a window."""
    return [p for p in docstring_pairs() if len(p["completion"]) < 120]


@pytest.fixture(scope="module")
def chats(tmp_path_factory, pairs) -> Path:
    """Half the pairs as ``messages`` records, half as prompt/completion pairs."""
    return write_chats(
        tmp_path_factory.mktemp("chats") / "chats.jsonl", [as_messages(p) if i % 2 else p for i, p in enumerate(pairs)]
    )


def make_dm(source, tokenizer, **given) -> ModLMDataModule:
    settings = dict(
        source=str(source),
        tokenizer=tokenizer,
        seq_len=SEQ,
        batch_size=BATCH,
        val_fraction=0.2,
        val_windows=8,
        num_workers=0,
        seed=3,
    )
    return ModLMDataModule(**{**settings, **given})


def windows_of(batch) -> list[tuple[list[int], list[int]]]:
    """Each row of a chat batch as (its tokens up to the padding, the targets that carry the loss)."""
    rows = []
    for ids, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist()):
        rows.append((ids, [t for t in targets if t != IGNORE_INDEX]))
    return rows


def test_each_window_holds_one_conversation_and_the_loss_its_answer(chats, tiny_tokenizer, pairs):
    dm = make_dm(chats, tiny_tokenizer[1])
    assert dm.is_chat and dm.tokenizer_vocab_size == 512
    encoder = ChatEncoder(dm.tokenizer.to_str())  # the tokenizer has no template: the default
    assert dm.chat_template == encoder.template
    eot = encoder.end_of_turn_id
    rendered = {tuple(encoder.encode(as_messages(p)["messages"])[0]): p["completion"] for p in pairs}
    seen = 0
    for batch in itertools.islice(dm.train_dataloader(), 5):
        assert batch["input_ids"].shape == batch["targets"].shape == (BATCH, SEQ)
        for ids, answer in windows_of(batch):
            window = ids + [None]
            conversation = next(k for k in rendered if tuple(window[: len(k)]) == k)  # one conversation from the start
            assert set(window[len(conversation) : -1]) <= {eot}  # then padding only
            decoded = encoder.tokenizer.decode(answer, skip_special_tokens=False)
            assert decoded == rendered[conversation] + "<|endoftext|>"
            seen += 1
    assert seen == 5 * BATCH


def test_a_conversation_is_computed_alike_whatever_shares_its_batch(tmp_path, tiny_tokenizer, pairs):
    """The trap of packing under top-k routing: a routed block picks the top-k of a whole window, so a
    packed neighbour would change which of a conversation's tokens it processes. One conversation per
    window: the same logits whatever else is in the batch."""
    first, others = pairs[0], pairs[1:]
    train = str(write_chats(tmp_path / "train.jsonl", others))
    a = make_dm(train, tiny_tokenizer[1], val_source=str(write_chats(tmp_path / "a.jsonl", [first, *others[:3]])))
    b = make_dm(train, tiny_tokenizer[1], val_source=str(write_chats(tmp_path / "b.jsonl", [first, *others[10:13]])))
    batch_a, batch_b = next(iter(a.val_dataloader())), next(iter(b.val_dataloader()))
    assert torch.equal(batch_a["input_ids"][0], batch_b["input_ids"][0])
    assert not torch.equal(batch_a["input_ids"][1:], batch_b["input_ids"][1:])
    torch.manual_seed(0)
    model = MoDTransformer(
        ModelConfig(vocab_size=512, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ, capacity=0.125, init_std=0.3)
    ).eval()
    with torch.no_grad():
        out_a, out_b = model(batch_a["input_ids"], routing="topk"), model(batch_b["input_ids"], routing="topk")
    assert torch.equal(out_a.routing[0].selected[0], out_b.routing[0].selected[0])
    torch.testing.assert_close(out_a.logits[0], out_b.logits[0], rtol=0, atol=1e-6)


def test_a_held_out_file_is_validated_whole_in_order(chats, tmp_path, tiny_tokenizer, pairs):
    held = write_chats(tmp_path / "held.jsonl", pairs[:6])
    dm = make_dm(chats, tiny_tokenizer[1], val_source=str(held), val_windows=100)
    encoder = ChatEncoder(dm.tokenizer.to_str())
    windows, mask = dm.validation_windows, dm.validation_loss_mask
    assert windows.shape == (6, SEQ + 1) and mask.shape == (6, SEQ)
    for row, m, pair in zip(windows, mask, pairs[:6]):
        ids, loss = encoder.encode(as_messages(pair)["messages"])
        assert (
            row[: len(ids)].tolist() == ids and m[: len(ids) - 1].tolist() == loss[1:] and not m[len(ids) - 1 :].any()
        )
    assert dm.corpus.counts.train == len(pairs)  # all of the training file trains
    batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [BATCH, 2]
    assert all(torch.equal(b["targets"] != IGNORE_INDEX, m) for b, m in zip(batches, mask.split(BATCH)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(chats, tiny_tokenizer, num_workers):
    n, k = 24, 9  # more batches than an epoch of this file
    straight = list(itertools.islice(make_dm(chats, tiny_tokenizer[1], num_workers=num_workers).train_dataloader(), n))
    first = make_dm(chats, tiny_tokenizer[1], num_workers=num_workers)
    head = list(itertools.islice(first.train_dataloader(), k))
    state = json.loads(json.dumps(first.state_dict()))
    second = make_dm(chats, tiny_tokenizer[1], num_workers=num_workers)
    second.load_state_dict(state)
    tail = list(itertools.islice(second.train_dataloader(), n - k))
    for a, b in zip(straight, head + tail, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    assert max(w["epoch"] for w in second.state_dict()["train"]["ranks"][0]["workers"]) >= 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 3: not JSON (Expecting property name enclosed in double quotes at column 2)"),
        (
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
            "line 3: message 1: role 'robot' is not one of",
        ),
        (json.dumps({"text": "a document"}), "line 3: expected an object with 'messages' or with 'prompt' and"),
        (json.dumps({"messages": [{"role": "user", "content": 7}]}), "line 3: message 1 (user): 'content' is 7"),
    ],
)
def test_a_malformed_line_is_refused_naming_it(tmp_path, tiny_tokenizer, pairs, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs[:2]) + line + "\n" + json.dumps(pairs[2]) + "\n")
    dm = make_dm(path, tiny_tokenizer[1])
    with pytest.raises(DataError) as err:
        _ = dm.tokenizer
    assert f"{path} {message}" in str(err.value) and "\n" not in str(err.value)


def test_conversations_without_an_answer_or_too_long_are_counted_and_reported(tmp_path, tiny_tokenizer, pairs, capsys):
    unanswered, long = {"messages": CONVERSATION[:2]}, {"prompt": "Say it all.", "completion": "word " * 200}
    records = pairs[:10] + [unanswered] * 3 + [long] * 2
    dm = make_dm(write_chats(tmp_path / "c.jsonl", records), tiny_tokenizer[1], val_fraction=0.0)
    with pytest.warns(DataWarning) as caught:
        _ = dm.tokenizer
    (warning,) = [str(w.message) for w in caught]
    assert (
        "left out of training and validation: 3 without an assistant turn (nothing to learn); 2 longer than the "
        f"{SEQ + 1}-token window (the longest has "
    ) in warning and "raise --data.seq_len to keep them" in warning
    counts = dm.corpus.counts
    assert (counts.train, counts.val, counts.no_answer, counts.too_long) == (10, 0, 3, 2)
    err = capsys.readouterr().err
    assert "has no chat template: conversations are rendered with modlm's default" in err
    assert f"10 conversations to train on, 0 to validate on, one per {SEQ + 1}-token window" in err
    with pytest.raises(DataError, match="no conversation to train on: 4 without an assistant turn"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ = make_dm(write_chats(tmp_path / "none.jsonl", [unanswered] * 4), tiny_tokenizer[1]).tokenizer


def test_what_chat_data_does_not_take(chats, tmp_path, tiny_tokenizer, pairs):
    from modlm.data.prepare import PrepareSettings, prepare_corpus

    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": p["completion"]}) + "\n" for p in pairs))
    with pytest.raises(DataError, match="--data.val_source holds out conversations of chat data, and .* holds docu"):
        _ = make_dm(text, tiny_tokenizer[1], val_source=str(chats)).corpus
    with pytest.raises(DataError, match="--data.val_source .* holds no conversations"):
        _ = make_dm(chats, tiny_tokenizer[1], val_source=str(text)).corpus
    with pytest.raises(DataError, match="holds conversations, which are read as they are"):
        prepare_corpus(
            str(chats),
            tmp_path / "prepared",
            PrepareSettings(
                vocab_size=512,
                tokenizer=tiny_tokenizer[1],
                text_field="text",
                val_fraction=0.1,
                seed=1,
                tokenizer_train_chars=1000,
                cache_dir=None,
                num_proc=1,
                shard_tokens=1000,
                progress=False,
            ),
        )
    with pytest.raises(DataError, match="does not exist"):
        _ = make_dm(chats, tiny_tokenizer[1], chat_template=str(tmp_path / "missing.jinja")).tokenizer


def test_a_hub_dataset_of_conversations_from_the_local_cache(tmp_path, monkeypatch, tiny_tokenizer, pairs):
    from huggingface_hub import constants

    from tests.data.corpus.test_hub import cache_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    lines = lambda rows: "".join(json.dumps(as_messages(p)) + "\n" for p in rows)  # noqa: E731
    cache_dataset(
        tmp_path / "hf",
        "someone/chats",
        "c" * 40,
        {"data/train.jsonl": lines(pairs[6:]), "data/validation.jsonl": lines(pairs[:6])},
    )
    dm = make_dm("hub:someone/chats", tiny_tokenizer[1], val_windows=100)
    assert dm.is_chat and dm.corpus.pins() == {"hub_revision": "c" * 40}
    encoder = ChatEncoder(dm.tokenizer.to_str())
    assert dm.validation_windows.shape[0] == 6  # the dataset's own validation split, in order
    for row, pair in zip(dm.validation_windows, pairs[:6]):
        ids = encoder.encode(as_messages(pair)["messages"])[0]
        assert row[: len(ids)].tolist() == ids
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (BATCH, SEQ) and (batch["targets"] != IGNORE_INDEX).any(1).all()
