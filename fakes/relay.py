"""A loopback stand-in for the relay's callback routes: records the worker's reports, its
credentials' health, and its presence with the moment each arrived; serves the owner's files (`GET /media/{id}`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.protocol import Credentials, Presence, ProtocolError, decode_credentials, decode_presence


@dataclass
class FakeRelay:
    token: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refuse: int = 0  # answer this many callbacks with 503 first, as a relay restarting would
    presence: list[tuple[float, Presence]] = field(default_factory=list)  # (time.monotonic(), what)
    media: dict[str, bytes] = field(default_factory=dict)  # the owner's files by id, as the relay keeps them
    media_requests: list[str] = field(default_factory=list)  # ids asked for, with the right token
    credentials: list[Credentials] = field(default_factory=list)  # the worker's findings, in order

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/callback", self._presence, methods=["POST"]),
                Route("/callback/{phone}", self._callback, methods=["POST"]),
                Route("/media/{id}", self._media, methods=["GET"]),
                Route("/credentials", self._credentials, methods=["POST"]),
            ]
        )

    async def _media(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        self.media_requests.append(request.path_params["id"])
        data = self.media.get(request.path_params["id"])
        if data is None:
            return JSONResponse({"detail": "no such file"}, status_code=404)
        return Response(data, media_type="application/octet-stream")

    def states(self) -> list[str]:
        return [said.state for _, said in self.presence]

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

    async def _credentials(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        try:
            self.credentials.append(decode_credentials(await request.json()))
        except ProtocolError as exc:  # as the relay answers: 4xx, which the worker never retries
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return JSONResponse({"ok": True})

    async def _presence(self, request: Request) -> JSONResponse:
        arrived = time.monotonic()
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        self.presence.append((arrived, decode_presence(await request.json())))
        return JSONResponse({"ok": True})
