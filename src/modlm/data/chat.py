"""Conversations as a model reads them: OpenAI-style messages, rendered with a chat template by transformers'
own renderer, tokenized, with the tokens that carry the loss (the assistant's).

    render_chat(messages)                      # modlm's default template, special tokens as modlm's BPE names them
    render_chat(messages, template, add_generation_prompt=True, eos_token="</s>", bos_token="<s>")
    check_messages(messages)                   # a ChatError naming what is wrong, else nothing
    encoder = ChatEncoder(tokenizer.to_str(), template)     # template None: the default
    ids, loss = encoder.encode(messages)       # token ids; loss[j]: token j is an assistant token
    encoder.end_of_turn, encoder.end_of_turn_id             # where an answer ends (generation stops there)

Messages are ``{"role": "system" | "user" | "assistant", "content": str}``. A template is jinja text, rendered
with the rules transformers uses (``transformers.utils.chat_template_utils.render_jinja_template``: its
sandbox, ``raise_exception``, ``trim_blocks``), with the special tokens a transformers tokenizer would pass
(``eos_token``, ``bos_token``, ...), so a conversation renders the same in modlm and in transformers.

The default template (``DEFAULT_CHAT_TEMPLATE``, for tokenizers without one, modlm's BPE among them) is the
Zephyr layout, each turn ``<|role|>\\n`` + content + the tokenizer's end-of-text token + ``\\n``, the
generation prompt ``<|assistant|>\\n``. Its end of turn is the end-of-text token (``<|endoftext|>`` for
modlm's BPE), so no token is added to a tokenizer: every modlm model already has that token's embedding,
already ends its documents with it, and ``generate`` already stops at it. The role markers are plain text
(a few tokens each).

Tokens. A rendered conversation is tokenized with special tokens recognised (as transformers'
``apply_chat_template`` does): the template writes them as text. The loss covers each assistant turn from
the first token of its content through its end-of-turn token (the first special token the template
writes after an answer), never the prompt, the role markers, the system or user turns, or what the
template writes after the end-of-turn token. The turns are found by rendering the conversation up to each
answer (the prompt, with the generation prompt) and through it, which needs a template that renders earlier
turns the same whatever follows (every common template does; one that does not is refused). Prompt and
answer pieces are tokenized separately, so an answer's tokens are those the model generates after the
prompt, tokenized whole, at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from tokenizers import Tokenizer

from ..model.chat_template import read_chat_template
from ..model.errors import UserError
from ..model.hf_format import template_tokens
from .errors import DataError

ROLES = ("system", "user", "assistant")
"""The roles a message may have."""

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token | default('<|endoftext|>')) + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""modlm's chat template, for a tokenizer without one:
``<|user|>\\nHi<|endoftext|>\\n<|assistant|>\\nHello!<|endoftext|>\\n`` (``eos_token`` is the tokenizer's
end-of-text token; ``<|endoftext|>`` when none is given)."""


class ChatError(DataError):
    """A conversation modlm cannot render: a bad message, a record that is no conversation, a template that
    refuses it or whose answers cannot be found."""


def check_messages(messages: Any) -> None:
    """Refuse (``ChatError``, naming the message and what is wrong) anything but a non-empty list of
    ``{"role": "system" | "user" | "assistant", "content": str}`` dicts (other keys are kept, unread)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"expected a non-empty list of messages, got {_short(messages)}")
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ChatError(f"message {n} is {_short(message)}, expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"message {n}: role {_short(role)} is not one of {', '.join(ROLES)}")
        if "content" not in message or message["content"] is None:
            raise ChatError(f"message {n} ({role}) has no 'content'")
        if not isinstance(message["content"], str):
            raise ChatError(f"message {n} ({role}): 'content' is {_short(message['content'])}, expected a string")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def conversation_of(record: Any) -> list[dict]:
    """The messages of a chat record: ``{"messages": [...]}``, or a prompt/completion pair
    (``{"prompt": str, "completion": str}``: a user turn and the assistant's answer; either side may be a
    list of messages instead), checked (``check_messages``)."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not (isinstance(prompt, (str, list)) and isinstance(completion, (str, list))):
            raise ChatError("'prompt' and 'completion' must each be a string or a list of messages")
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + (
            [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        )
    else:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else _short(record)
        raise ChatError(
            f"expected an object with 'messages' or with 'prompt' and 'completion', got {keys or 'nothing'}"
        )
    check_messages(messages)
    return messages


def is_chat_record(record: Any, text_field: str) -> bool:
    """Whether a data record is a conversation rather than a document: it has ``messages`` (or
    ``prompt`` and ``completion``) and no ``text_field``."""
    return (
        isinstance(record, dict)
        and text_field not in record
        and ("messages" in record or ("prompt" in record and "completion" in record))
    )


def render_chat(
    messages: list[dict], template: Optional[str] = None, add_generation_prompt: bool = False, **special_tokens
) -> str:
    """``messages`` rendered with ``template`` (None: ``DEFAULT_CHAT_TEMPLATE``) by transformers' renderer,
    the template seeing ``messages``, ``add_generation_prompt`` (end with the assistant's header) and
    ``special_tokens`` (``eos_token="</s>"``, ...). A bad message, or a template that raises, is a ChatError."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    check_messages(messages)
    try:
        rendered, _ = render_jinja_template(
            [messages],
            chat_template=template or DEFAULT_CHAT_TEMPLATE,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except TemplateError as err:
        raise ChatError(f"the chat template refused the conversation: {str(err).strip().splitlines()[0]}") from None
    return rendered[0]


def chat_template_for(spec: Optional[str], tokenizer_file: Union[str, Path]) -> Optional[str]:
    """The chat template a run renders its conversations with: ``spec`` (``--data.chat_template``: a jinja
    file, or a folder keeping one as transformers does), else the one kept beside the tokenizer (its folder's
    ``chat_template.jinja`` or ``tokenizer_config.json``); None when there is none (then the default)."""
    if spec:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = read_chat_template(path)
            if found is None:
                raise ChatError(
                    f"chat template {spec!r}: the folder keeps none (no chat_template.jinja, no "
                    "chat_template in tokenizer_config.json)"
                )
            return found
        if not path.is_file():
            raise ChatError(f"chat template {spec!r} does not exist (expected a .jinja file or a folder keeping one)")
        return path.read_text(encoding="utf-8")
    return read_chat_template(Path(tokenizer_file).parent)


class ChatEncoder:
    """A tokenizer and its chat template: conversations to token ids, with the assistant tokens marked.

    ``tokenizer_json``: the tokenizer's ``tokenizer.json`` text (what travels with a model); ``template``:
    the chat template (None: ``DEFAULT_CHAT_TEMPLATE``). Picklable (dataloader workers rebuild the
    tokenizer from its text)."""

    def __init__(self, tokenizer_json: str, template: Optional[str] = None):
        self.tokenizer_json = tokenizer_json
        self.template = template or DEFAULT_CHAT_TEMPLATE
        try:
            self.special_tokens = template_tokens(tokenizer_json)
        except UserError as err:  # a tokenizer without an end-of-text token
            raise ChatError(str(err)) from None
        self._tok: Optional[Tokenizer] = None
        self.end_of_turn = self._find_end_of_turn()
        """The special token that ends an answer: where the loss of an assistant turn ends, and a reply's
        generation stops."""
        self.end_of_turn_id = self.tokenizer.token_to_id(self.end_of_turn)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, special tokens recognised in the text it encodes (a template writes them)."""
        if self._tok is None:
            self._tok = Tokenizer.from_str(self.tokenizer_json)
            self._tok.encode_special_tokens = False
        return self._tok

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, self.template, add_generation_prompt, **self.special_tokens)

    def _special_ids(self) -> set[int]:
        return {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}

    def _find_end_of_turn(self) -> str:
        """The first special token the template writes after an answer's content."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        before, through = self.render(probe[:1], add_generation_prompt=True), self.render(probe)
        if not through.startswith(before):
            raise ChatError(self._unstable())
        tail = self.tokenizer.encode(through[len(before) :], add_special_tokens=False)
        special = self._special_ids()
        found = next((token for i, token in zip(tail.ids, tail.tokens) if i in special), None)
        if found is None:
            raise ChatError(
                "the chat template ends an answer with no special token of the tokenizer (rendered: "
                f"{through[len(before) :]!r}), so a generated answer could not end"
            )
        return found

    @staticmethod
    def _unstable() -> str:
        return (
            "the chat template renders the turns before an answer differently once the answer follows, so "
            "the answer's tokens cannot be found for the loss; use a template that renders a conversation's "
            "beginning the same whatever follows"
        )

    def answer_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """The character spans of ``text`` (``messages`` rendered) that carry the loss: each assistant turn
        from its content through its end-of-turn token."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, through = self.render(messages[:i], add_generation_prompt=True), self.render(messages[: i + 1])
            if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
                raise ChatError(self._unstable())
            end = text.rfind(self.end_of_turn, len(prompt), len(through))
            spans.append((len(prompt), end + len(self.end_of_turn) if end >= 0 else len(through)))
        return spans

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """The token ids of ``messages`` rendered (ending with the assistant's header with
        ``add_generation_prompt``: a prompt to generate the next answer from), and for each token whether it
        is an assistant token (an answer or its end-of-turn token: what the loss is taken on)."""
        text = self.render(messages, add_generation_prompt)
        cuts, at = [], 0
        for start, end in self.answer_spans(messages, text):
            cuts += [(at, start, False), (start, end, True)]
            at = end
        cuts.append((at, len(text), False))
        cuts = [(a, b, answer) for a, b, answer in cuts if b > a]
        pieces = self.tokenizer.encode_batch([text[a:b] for a, b, _ in cuts], add_special_tokens=False)
        ids, loss = [], []
        for (_, _, answer), piece in zip(cuts, pieces):
            ids += piece.ids
            loss += [answer] * len(piece.ids)
        return ids, loss


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ROLES",
    "ChatEncoder",
    "ChatError",
    "chat_template_for",
    "check_messages",
    "conversation_of",
    "is_chat_record",
    "render_chat",
]
