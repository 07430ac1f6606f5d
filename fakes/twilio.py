"""A loopback fake of Twilio's Messages REST API that records sends and can be told to fail."""

from __future__ import annotations

import base64
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

# A scripted answer: an HTTP status (500, 429), (status, twilio error code), or "stall".
Scripted = int | tuple[int, int] | str


@dataclass
class Sent:
    to: str
    from_: str
    body: str
    media: list[str]
    at: float
    sid: str


@dataclass
class FakeTwilio:
    account_sid: str
    auth_token: str
    messages: list[Sent] = field(default_factory=list)
    attempts: int = 0
    in_flight: int = 0  # requests being answered right now (a stall holds one)
    script: list[Scripted] = field(default_factory=list)
    stall_s: float = 30.0
    down: bool = False  # answer every request with 500, as during an outage
    failure_rate: float = 0.0  # this share of requests fails at random: 500, 429, or a stall
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    _sids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fail_next(self, *answers: Scripted) -> None:
        self.script.extend(answers)

    def bodies(self, to: str | None = None) -> list[str]:
        return [m.body for m in self.messages if to is None or m.to == f"whatsapp:{to}"]

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/2010-04-01/Accounts/{sid}/Messages.json", self._create, methods=["POST"])])

    async def _create(self, request: Request) -> JSONResponse:
        self.attempts += 1
        self.in_flight += 1
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: Request) -> JSONResponse:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        authorized = request.headers.get("authorization") == f"Basic {expected}"
        if not authorized or request.path_params["sid"] != self.account_sid:
            return _twilio_error(401, 20003, "Authenticate")
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        if self.down:
            return _twilio_error(500, None, "outage")
        if not self.script and self.failure_rate and self.rng.random() < self.failure_rate:
            failures: list[Scripted] = [500, 429, "stall"]
            self.script.append(self.rng.choice(failures))
        if self.script:
            answer = self.script.pop(0)
            if answer == "stall":
                # A connection that hangs before Twilio took the message: the client gives up.
                await anyio.sleep(self.stall_s)
                return _twilio_error(504, None, "stalled")
            elif isinstance(answer, tuple):
                return _twilio_error(answer[0], answer[1], "scripted refusal")
            elif isinstance(answer, int):
                return _twilio_error(answer, None, "scripted failure")
        fields: dict[str, Any] = dict(form)
        sid = f"SM{next(self._sids):032d}"
        self.messages.append(
            Sent(
                to=fields.get("To", ""),
                from_=fields.get("From", ""),
                body=fields.get("Body", ""),
                media=[v for k, v in form if k == "MediaUrl"],
                at=time.monotonic(),
                sid=sid,
            )
        )
        return JSONResponse(
            {
                "sid": sid,
                "status": "queued",
                "to": fields.get("To"),
                "from": fields.get("From"),
                "body": fields.get("Body"),
                "account_sid": self.account_sid,
            },
            status_code=201,
        )


def _twilio_error(status: int, code: int | None, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "more_info": "", "status": status}, status_code=status)
