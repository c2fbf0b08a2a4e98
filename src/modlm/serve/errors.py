"""Errors as OpenAI's API writes them, so that its clients raise the right exception with the message.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (5xx for the
server's own failures): whatever a client sends, the answer is such a body and the next request is
served.
"""

from __future__ import annotations

from typing import Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """A request refused with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def invalid(param: str, message: str) -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(400, message, param=param)


def _validation_message(err: RequestValidationError) -> tuple[str, Optional[str]]:
    """The first thing wrong with a body, as one sentence, and the field it concerns."""
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union's members add their type names to the location: keep the field's own path
    field = ".".join(part for part in loc if not part[:1].isupper() and not part.startswith(("list[", "str", "int")))
    message = first.get("msg", "invalid value")
    if "input" in first and first.get("type") != "missing":
        message += f" (got {first['input']!r:.80})"
    return (f"{field}: {message}" if field else message), field or None


def install(app) -> None:
    """Answer every error the app meets as an OpenAI-style body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        message, field = _validation_message(err)
        return APIError(400, message, param=field).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        return APIError(500, f"the server failed: {type(err).__name__}: {err}", type="server_error").response()
