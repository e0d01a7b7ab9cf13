"""The server's HTTP vocabulary, shared by its modules: the request-id key, 4xx errors that carry
their message to the client, the JSON error response, and JSON dumps for reports.

Invariant: every error answer is ``{"error", "request_id"}`` JSON with the request id also in
the ``X-Request-Id`` header; a 4xx names what was wrong, a 500 names only the exception type.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

__all__ = ["REQUEST_ID", "BadRequestError", "describe", "dumps", "error_response"]

REQUEST_ID = web.RequestKey("request_id", str)


class BadRequestError(ValueError):
    """A 4xx answer with a message; ``status`` defaults to 400."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str, request_id: str) -> web.Response:
    return web.json_response(
        {"error": message, "request_id": request_id}, status=status, headers={"X-Request-Id": request_id}
    )


def describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc) or type(exc).__name__


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
