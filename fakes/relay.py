"""A loopback stand-in for the relay's callback route: records the worker's events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class FakeRelay:
    token: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refuse: int = 0  # answer this many callbacks with 503 first, as a relay restarting would

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/callback/{phone}", self._callback, methods=["POST"])])

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e["type"] in types]

    def types(self) -> list[str]:
        return [e["type"] for _, e in self.events]

    async def _callback(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        if self.refuse > 0:
            self.refuse -= 1
            return JSONResponse({"detail": "restarting"}, status_code=503)
        self.events.append((request.path_params["phone"], await request.json()))
        return JSONResponse({"ok": True})
