"""The HTTP side: a FastAPI app with OpenAI's endpoints over one ``Engine``.

``GET /health`` (open to all: whether the decode loop runs, and its load), ``GET /v1/models``,
``POST /v1/completions`` (text continued until the end-of-text token) and ``POST /v1/chat/completions``
(messages rendered with the model's chat template, answered until its end-of-turn token: what
``modlm-generate --chat`` does), behind the API key when one is set.
Bodies are capped at ``max_body_bytes`` (413 past it); every refusal is an OpenAI-style error
(``errors.py``). The app starts the engine's thread when it starts and stops it when it stops, after
the server has finished (or, past its grace period, cancelled) the requests in flight.
"""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..data.chat import ChatEncoder, ChatError
from . import errors
from .completions import ChatFormat, Completions, TextFormat
from .errors import APIError, invalid
from .schema import ChatRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 16
"""``max_tokens`` of a completion that names none (OpenAI's default for ``/v1/completions``)."""


class BodyLimit:
    """Refuse (413) a request body over ``max_bytes``, by its declared length or as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = APIError(413, f"the request body is over {self.max_bytes} bytes").response()
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI hands an HTTPException raised while reading to the handlers
                raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counted, send)


def bearer(api_key: str):
    """A dependency refusing (401) a request without ``Authorization: Bearer <api_key>``."""

    def check(authorization: Optional[str] = Header(None)) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided: send the server's key as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    return check


def create_app(
    completions: Completions,
    chat: ChatEncoder,
    end_of_text: Optional[int],
    api_key: Optional[str] = None,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The app: completions end at the ``end_of_text`` token, chats at ``chat``'s end of turn."""
    engine = completions.engine
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="modlm-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    keyed = [Depends(bearer(api_key))] if api_key else []

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "stopping" if engine.thread.is_alive() else "stopped"}, status_code=503)
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": completions.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "modlm",
                    "max_model_len": completions.context,
                }
            ],
        }

    @app.post("/v1/completions", dependencies=keyed)
    async def text_completions(body: CompletionRequest, request: Request):
        completions.check_model(body)
        body.refuse_unsupported()
        prompt = (
            body.prompt[0]
            if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str)
            else body.prompt
        )
        ids = (
            (await run_in_threadpool(lambda: completions.tokenizer.encode(prompt).ids))
            if isinstance(prompt, str)
            else list(prompt)
        )
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, completions.context - len(ids)))
        return await completions.answer(request, body, ids, max_tokens, end_of_text, TextFormat())

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatRequest, request: Request):
        completions.check_model(body)
        body.refuse_unsupported()
        messages = body.conversation()
        try:  # the prompt modlm-generate --chat renders: the conversation up to the assistant's header
            ids = await run_in_threadpool(lambda: chat.encode(messages, add_generation_prompt=True)[0])
        except ChatError as err:
            raise invalid("messages", f"messages: {str(err).strip().splitlines()[0]}") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await completions.answer(request, body, ids, max_tokens, chat.end_of_turn_id, ChatFormat())

    return app
