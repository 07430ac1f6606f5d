"""The local chat: a phone-shaped page standing in for WhatsApp, and a stand-in for Twilio.

The page's messages become webhooks signed with the twilio SDK, exactly as Twilio would sign
them, posted to the relay. The relay, pointed here by TWILIO_API_BASE_URL, sends its replies
through the same REST call it makes to Twilio, so every outbound message appears in the page
as it is sent, images included.
"""

from __future__ import annotations

import base64
import hmac
import itertools
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

PAGE = Path(__file__).with_name("page.html")
MAX_TEXT = 4096


@dataclass
class ChatMessage:
    id: int
    sender: str  # "owner" or "textslash"
    body: str
    media: list[str]
    at: float


@dataclass
class Chat:
    """One owner's conversation with the relay, as the local page shows it."""

    relay_url: str
    public_url: str  # what the relay's PUBLIC_URL is: signatures are made against it
    account_sid: str
    auth_token: str = field(repr=False)
    owner: str
    bot_number: str
    http: httpx.AsyncClient
    demo: bool = False
    messages: list[ChatMessage] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _closing: bool = False

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self._page),
                Route("/api/info", self._info),
                Route("/api/send", self._send, methods=["POST"]),
                Route("/api/messages", self._messages),
                Route("/2010-04-01/Accounts/{sid}/Messages.json", self._twilio_create, methods=["POST"]),
            ]
        )

    def _add(self, sender: str, body: str, media: list[str]) -> ChatMessage:
        message = ChatMessage(next(self._ids), sender, body, media, time.time())
        self.messages.append(message)
        self._changed.set()
        self._changed = anyio.Event()
        return message

    async def _page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def _info(self, request: Request) -> JSONResponse:
        return JSONResponse({"owner": self.owner, "demo": self.demo})

    async def _send(self, request: Request) -> JSONResponse:
        try:
            text = str((await request.json())["text"]).strip()
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"detail": 'expected {"text": ...}'}, status_code=400)
        if not text or len(text) > MAX_TEXT:
            return JSONResponse({"detail": f"a message has 1 to {MAX_TEXT} characters"}, status_code=400)
        self._add("owner", text, [])
        params = {
            "MessageSid": "SM" + secrets.token_hex(16),
            "AccountSid": self.account_sid,
            "From": f"whatsapp:{self.owner}",
            "To": f"whatsapp:{self.bot_number}",
            "Body": text,
            "NumMedia": "0",
            "ProfileName": "You",
        }
        signature = RequestValidator(self.auth_token).compute_signature(f"{self.public_url}/webhook", params)
        try:
            response = await self.http.post(
                f"{self.relay_url}/webhook", data=params, headers={"X-Twilio-Signature": signature}, timeout=10.0
            )
        except httpx.HTTPError as exc:
            self._add("textslash", f"⚠️ The relay is not answering ({type(exc).__name__}).", [])
            return JSONResponse({"detail": "relay unreachable"}, status_code=502)
        return JSONResponse({"relay_status": response.status_code})

    def close(self) -> None:
        """Answer every waiting long poll now, so the server stops without cancelling them."""
        self._closing = True
        self._changed.set()

    async def _messages(self, request: Request) -> JSONResponse:
        """Long poll: messages after `after`, waiting up to 20 s for one to arrive."""
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return JSONResponse({"detail": "after must be a number"}, status_code=400)
        with anyio.move_on_after(20):
            while not self._closing and not any(m.id > after for m in self.messages):
                await self._changed.wait()
        return JSONResponse([asdict(m) for m in self.messages if m.id > after])

    async def _twilio_create(self, request: Request) -> Response:
        """Twilio's `Messages.json`, as the relay's twilio client calls it."""
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given, f"Basic {expected}") or request.path_params["sid"] != self.account_sid:
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        fields: dict[str, Any] = dict(form)
        message = self._add("textslash", fields.get("Body", ""), [v for k, v in form if k == "MediaUrl"])
        sid = f"SM{message.id:032d}"
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
