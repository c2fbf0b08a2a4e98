"""Conversations rendered and tokenized (``modlm.data.chat``): the default template's layout, the same text and
tokens as transformers' ``apply_chat_template``, the loss on each answer and its end-of-turn token alone,
and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modlm.data.chat import DEFAULT_CHAT_TEMPLATE, ChatEncoder, ChatError, check_messages, conversation_of, render_chat
from modlm.data.tokenizer import load_tokenizer
from tests.helpers.chat import CHATML_TEMPLATE, CONVERSATION, chatml_tokenizer_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def modlm_tokenizer(tiny_tokenizer) -> str:
    """modlm's BPE (``<|endoftext|>`` its one special token), as ``tokenizer.json`` text."""
    return load_tokenizer(tiny_tokenizer[1]).to_str()


@pytest.fixture(scope="module")
def chatml(tmp_path_factory, tiny_tokenizer) -> Path:
    return chatml_tokenizer_folder(tmp_path_factory.mktemp("chatml") / "tok", tiny_tokenizer[0])


def hf_tokenizer(tokenizer_json: str, template: str, **special):
    """transformers' fast tokenizer over the same tokenizer.json and template, special tokens kept whole."""
    from tokenizers import Tokenizer

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), split_special_tokens=False, **special
    )
    tok.chat_template = template
    return tok


def test_the_default_template_is_the_documented_layout():
    assert render_chat(CONVERSATION[1:3]) == (
        "<|user|>\nWhat does `textwrap.dedent` do?<|endoftext|>\n"
        "<|assistant|>\nRemove any common leading whitespace from every line in "
        "text.<|endoftext|>\n"
    )
    assert render_chat(CONVERSATION[:2], add_generation_prompt=True, eos_token="</s>") == (
        "<|system|>\nAnswer in one sentence.</s>\n<|user|>\nWhat does `textwrap.dedent` do?</s>\n<|assistant|>\n"
    )
    assert render_chat(CONVERSATION[:2], DEFAULT_CHAT_TEMPLATE) == render_chat(CONVERSATION[:2])


@pytest.mark.parametrize("which", ["default", "chatml"])
def test_text_and_tokens_are_transformers_apply_chat_template(which, modlm_tokenizer, chatml):
    """The rendered text, and the ids, equal transformers' for the same tokenizer, template and special
    tokens, with and without the generation prompt (an answer typing a special token is read as that token,
    as transformers reads it)."""
    if which == "default":
        tokenizer_json, template = modlm_tokenizer, None
    else:
        tokenizer_json, template = (chatml / "tokenizer.json").read_text(), CHATML_TEMPLATE
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    encoder = ChatEncoder(tokenizer_json, template)
    assert encoder.special_tokens == special
    hf = hf_tokenizer(tokenizer_json, template or DEFAULT_CHAT_TEMPLATE, **special)
    odd = CONVERSATION[:2] + [{"role": "assistant", "content": "a<|endoftext|>b, caf\u00e9\n\ttab"}]
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:4], True), (odd, False)):
        assert encoder.render(messages, prompt) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
        assert encoder.encode(messages, prompt)[0] == want


def answer_runs(encoder: ChatEncoder, ids: list[int], loss: list[bool]) -> list[str]:
    """The decoded text of each run of loss tokens."""
    runs, current = [], []
    for token, on in zip(ids + [None], loss + [False]):
        if on:
            current.append(token)
        elif current:
            runs.append(encoder.tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


@pytest.mark.parametrize("which, end", [("default", "<|endoftext|>"), ("chatml", "<|im_end|>")])
def test_the_loss_covers_each_answer_through_its_end_of_turn_token(which, end, modlm_tokenizer, chatml):
    """Each answer and the end-of-turn token after it, nothing else: not the system or user turns, not the
    role headers, not the newline a template writes after the end of turn (ChatML's end of turn is not the
    end of text)."""
    tokenizer_json = modlm_tokenizer if which == "default" else (chatml / "tokenizer.json").read_text()
    encoder = ChatEncoder(tokenizer_json, None if which == "default" else CHATML_TEMPLATE)
    assert encoder.end_of_turn == end and encoder.tokenizer.id_to_token(encoder.end_of_turn_id) == end
    ids, loss = encoder.encode(CONVERSATION)
    assert answer_runs(encoder, ids, loss) == [m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
    # a user turn after the last answer adds tokens, none of them a loss token
    more, more_loss = encoder.encode(CONVERSATION + [{"role": "user", "content": "Thanks!"}])
    assert more[: len(ids)] == ids and more_loss[: len(loss)] == loss and not any(more_loss[len(loss) :])
    # the prompt of the next answer is the conversation so far and the assistant's header, no loss anywhere
    prompt, prompt_loss = encoder.encode(CONVERSATION[:4], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and prompt_loss == loss[: len(prompt)]
    assert loss[len(prompt)] and not loss[len(prompt) - 1]  # the answer starts right after the prompt


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "expected a non-empty list of messages"),
        ("hello", "expected a non-empty list of messages, got 'hello'"),
        ([{"role": "user", "content": "a"}, "b"], "message 2 is 'b', expected an object with 'role' and 'content'"),
        ([{"role": "bot", "content": "a"}], "message 1: role 'bot' is not one of system, user, assistant"),
        ([{"content": "a"}], "message 1: role None is not one of"),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 2 (assistant) has no 'content'"),
        ([{"role": "user", "content": ["a", "b"]}], "message 1 (user): 'content' is ['a', 'b'], expected a string"),
    ],
)
def test_a_bad_message_is_named(messages, message):
    with pytest.raises(ChatError) as err:
        check_messages(messages)
    assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ChatError):
        render_chat(messages)


def test_records_are_messages_or_prompt_completion_pairs():
    pair = {"prompt": "What is 2 + 2?", "completion": "4"}
    want = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert conversation_of(pair) == want
    listed = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}
    assert conversation_of(listed) == CONVERSATION[:3] == conversation_of({"messages": CONVERSATION[:3]})
    for record, message in (
        ({"text": "a document"}, "expected an object with 'messages' or with 'prompt' and 'completion', got 'text'"),
        ({"prompt": 3, "completion": "4"}, "'prompt' and 'completion' must each be"),
        ({"messages": [{"role": "user"}]}, "message 1 (user) has no 'content'"),
        (["not", "an object"], "expected an object with 'messages'"),
    ):
        with pytest.raises(ChatError, match=message.replace("(", r"\(").replace(")", r"\)")):
            conversation_of(record)


def test_templates_whose_answers_cannot_be_found_are_refused(modlm_tokenizer):
    last_only = "{{ messages[-1]['content'] }}<|endoftext|>"  # earlier turns vanish once an answer follows
    with pytest.raises(ChatError, match="renders the turns before an answer differently"):
        ChatEncoder(modlm_tokenizer, last_only)
    no_end = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatError, match="ends an answer with no special token"):
        ChatEncoder(modlm_tokenizer, no_end)
    raising = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ChatError, match="the chat template refused the conversation: only user turns"):
        render_chat(CONVERSATION, raising)


def test_the_encoder_travels_to_dataloader_workers(modlm_tokenizer):
    import pickle

    encoder = ChatEncoder(modlm_tokenizer)
    _ = encoder.tokenizer
    copy = pickle.loads(pickle.dumps(encoder))
    assert copy.encode(CONVERSATION) == encoder.encode(CONVERSATION) and json.loads(copy.tokenizer_json)
