"""Bounded requests and error answers, whatever a client sends.

* ``BodyLimit``: a request body over ``serve_max_body_bytes`` is answered 413 before it is read
  whole: a declared Content-Length over the limit without reading any of it, a chunked body as
  soon as the bytes received pass the limit. A body that fits is handed to the app as usual.
* ``validation_errors``: a 422 lists at most ``MAX_ERRORS`` errors, each the field path, a
  message and a type, cut to a few hundred characters; never the input (FastAPI's default
  echoes it, so a 50 MB invalid body came back as a 50 MB answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_ERRORS = 20
MAX_PATH_PARTS = 8
MAX_TEXT = 120  # per path part and message: an unknown field's name comes from the client


def short_errors(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 body: ``detail`` (the first ``MAX_ERRORS`` errors) and ``error_count`` (all)."""
    detail = [{"loc": [p if isinstance(p, int) else str(p)[:MAX_TEXT] for p in error["loc"][:MAX_PATH_PARTS]],
               "msg": str(error["msg"])[:MAX_TEXT], "type": str(error["type"])[:MAX_TEXT]}
              for error in errors[:MAX_ERRORS]]
    return {"detail": detail, "error_count": len(errors)}


async def validation_errors(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content=short_errors(exc.errors()))


class BodyLimit:
    """ASGI middleware: reads the body (at most ``max_bytes`` of it) before the app runs."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left: nobody to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close, so the server does not go on reading (and discarding) the rest.
        response = JSONResponse(status_code=413, headers={"connection": "close"},
                                content={"detail": f"request body over {self.max_bytes} bytes"})
        await response(scope, receive, send)
