"""From a checked request to its answer: the engine's job, then OpenAI's response body, whole or
streamed as server-sent events.

The two endpoints differ only in how a choice is written (``TextFormat`` for ``/v1/completions``,
``ChatFormat`` for ``/v1/chat/completions``); everything else (limits, sampling, streaming, a client
that goes away) is ``Completions``'.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Engine, Job, QueueFull, Sampling, Stopped, Update
from .errors import APIError, invalid
from .schema import Sampled
from .text import TextStream

DISCONNECT_POLL_S = 0.2
"""How often a request answered whole checks that its client is still there."""


class TextFormat:
    """Choices of ``/v1/completions``."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, text: str, finish_reason: Optional[str]) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, text: str, finish_reason: Optional[str]) -> dict:
        return self.choice(text, finish_reason)

    def opening(self) -> Optional[dict]:
        """The choice of a stream's first chunk, before any text (None: none)."""
        return None


class ChatFormat:
    """Choices of ``/v1/chat/completions``: the assistant's message, a stream of deltas to it."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, text: str, finish_reason: Optional[str]) -> dict:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def chunk(self, text: str, finish_reason: Optional[str]) -> dict:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> Optional[dict]:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


class Completions:
    """Answers generating requests for the model ``name`` (``context`` tokens long) through ``engine``."""

    def __init__(self, engine: Engine, tokenizer, name: str, context: int, vocab_size: int):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.context, self.vocab_size = context, vocab_size

    def check_model(self, body: Sampled) -> None:
        if body.model != self.name:
            raise APIError(
                404,
                f"The model `{body.model}` does not exist: this server serves `{self.name}`",
                param="model",
                code="model_not_found",
            )

    def job(self, body: Sampled, prompt: list[int], max_tokens: Optional[int], end_id: Optional[int], emit) -> Job:
        """The engine's job for ``prompt``, ending at ``end_id``, or a 400 naming what does not fit.
        ``max_tokens`` None: up to the end of the context."""
        if not prompt:
            raise invalid("prompt", "prompt: it encodes to no token")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise invalid("prompt", f"prompt: token ids must be in [0, {self.vocab_size})")
        room = self.context - len(prompt)
        if room < 1:
            raise invalid(
                "prompt",
                f"This model's maximum context length is {self.context} tokens; the prompt "
                f"has {len(prompt)}, leaving no room for a completion",
            )
        if max_tokens is not None and max_tokens > room:
            raise invalid(
                "max_tokens",
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} "
                "in the completion). Please reduce the prompt or max_tokens.",
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = None if body.top_p in (None, 1) else body.top_p
        sampling = Sampling(temperature=temperature, top_k=body.top_k, top_p=top_p, seed=body.seed)
        return Job(
            prompt=prompt,
            max_tokens=room if max_tokens is None else max_tokens,
            sampling=sampling,
            stream=TextStream(self.tokenizer, body.stops()),
            emit=emit,
            end_id=end_id,
        )

    async def answer(
        self, request: Request, body: Sampled, prompt: list[int], max_tokens: Optional[int], end_id: Optional[int], form
    ) -> JSONResponse | StreamingResponse:
        """Run ``prompt`` until ``end_id`` (or ``max_tokens``, a stop string) and answer in ``form``
        (``TextFormat``, ``ChatFormat``), whole or streamed."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()

        def emit(update: Update) -> None:  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(updates.put_nowait, update)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        job = self.job(body, prompt, max_tokens, end_id, emit)
        try:
            self.engine.submit(job)
        except QueueFull as err:
            raise APIError(
                503, f"The server is overloaded ({err}); retry later", type="server_error", code="server_overloaded"
            ) from None
        except Stopped as err:
            raise APIError(503, str(err), type="server_error", code="shutting_down") from None
        head = {"id": form.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": self.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._events(job, updates, head, form, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(await self._whole(request, job, updates, head, form))

    def usage(self, job: Job) -> dict:
        return {
            "prompt_tokens": len(job.prompt),
            "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt) + job.completion_tokens,
        }

    async def _whole(self, request: Request, job: Job, updates: asyncio.Queue, head: dict, form) -> dict:
        parts, finished = [], False
        loop = asyncio.get_running_loop()
        check = loop.time() + DISCONNECT_POLL_S
        try:
            while not finished:
                try:
                    update = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    update = None
                if loop.time() >= check:  # while text flows too
                    check = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():  # nobody to answer: the finally frees the row
                        raise APIError(499, "the client closed the request")
                if update is None:
                    continue
                parts.append(update.text)
                finished = update.finish_reason is not None
                if update.error:
                    raise APIError(500, update.error, type="server_error")
        finally:
            if not finished:
                self.engine.cancel(job)
        choice = form.choice("".join(parts), update.finish_reason)
        return {**head, "object": form.object, "choices": [choice], "usage": self.usage(job)}

    async def _events(
        self, job: Job, updates: asyncio.Queue, head: dict, form, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the last with its finish reason, then the
        usage (when asked for) and ``[DONE]``. An error ends the stream with an error event."""
        finished = False

        def event(choices: list, **extra) -> str:
            chunk = {**head, "object": form.chunk_object, "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            opening = form.opening()
            if opening is not None:
                yield event([opening])
            while not finished:
                update = await updates.get()
                finished = update.finish_reason is not None
                if update.error:
                    error = {"message": update.error, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                if update.text or finished:
                    yield event([form.chunk(update.text, update.finish_reason)])
            if finished and not update.error and include_usage:
                yield event([], usage=self.usage(job))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (the response was cancelled): free its row
                self.engine.cancel(job)
