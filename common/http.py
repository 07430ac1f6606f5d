"""HTTP helpers both apps share: the bearer check, a size-limited body, a protocol message read
from it, a JSON error."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from common.protocol import ProtocolError

T = TypeVar("T")


class Problem(Exception):
    """A request we refuse, with the status and the reason the client gets."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def bearer_ok(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "body too large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Problem(413, "body too large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Problem(400, "client disconnected") from None
    return b"".join(chunks)


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise Problem(400, "body must be JSON") from None
    if not isinstance(data, dict):
        raise Problem(422, "body must be a JSON object")
    return data


async def read_message(request: Request, limit: int, decode: Callable[[dict[str, Any]], T]) -> T:
    """A JSON body read through one of common/protocol.py's decoders; malformed, it is a 422."""
    data = await read_json_object(request, limit)
    try:
        return decode(data)
    except ProtocolError as exc:
        raise Problem(422, str(exc)) from None


def error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
