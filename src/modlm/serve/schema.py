"""The request bodies the server reads, as OpenAI's API defines them (pydantic checks types and
ranges; a body that fails is a 400 naming the field), and the fields it does not implement.

Fields a client library sends with their defaults (``n=1``, ``presence_penalty=0``, ``logprobs=null``)
are accepted; a value that asks for something this server does not do is refused by name rather
than ignored. ``top_k`` is an extension (OpenAI has none; vLLM and others read it the same way).
Unknown fields are ignored, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import invalid

MAX_STOPS = 4
"""Stop strings per request (OpenAI's limit)."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """What every generating request carries."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = 1
    presence_penalty: Optional[float] = 0
    frequency_penalty: Optional[float] = 0
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise invalid("stop", f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise invalid("stop", "stop: a stop string must not be empty")
        return stops

    def refuse_unsupported(self) -> None:
        """A 400 for a field whose value asks for what this server does not do."""
        if self.n not in (None, 1):
            raise invalid("n", f"n: only one choice per request is supported, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise invalid(name, f"{name}: penalties are not supported (send 0 or leave it out)")
        if self.logit_bias:
            raise invalid("logit_bias", "logit_bias: not supported")


class CompletionRequest(Sampled):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(None, ge=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise invalid("prompt", f"prompt: one prompt per request is supported, got {len(self.prompt)}")
        for name, default in (("echo", False), ("logprobs", None), ("suffix", None)):
            if getattr(self, name) not in (default, None):
                raise invalid(name, f"{name}: not supported")
        if self.best_of not in (None, 1):
            raise invalid("best_of", f"best_of: only 1 is supported, got {self.best_of}")


class ChatRequest(Sampled):
    """``POST /v1/chat/completions``: messages, rendered with the model's chat template."""

    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    tools: Optional[list[Any]] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise invalid("logprobs", "logprobs: not supported")
        if self.tools:
            raise invalid("tools", "tools: not supported")

    def conversation(self) -> list[dict]:
        """The messages with their content as text: a list of text parts (what some clients send) joined.
        Roles and the rest are the chat template's to check (``modlm.data.chat.check_messages``)."""
        messages = []
        for n, message in enumerate(self.messages, 1):
            content = message.get("content")
            if isinstance(content, list):
                if not all(
                    isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    for part in content
                ):
                    raise invalid("messages", f"messages: message {n}: only text content is supported")
                message = {**message, "content": "".join(part["text"] for part in content)}
            messages.append(message)
        return messages
