"""The local chat: a phone-shaped page standing in for WhatsApp, and a stand-in for Twilio.

The page's messages become webhooks signed with the twilio SDK, exactly as Twilio would sign
them, posted to the relay. The relay, pointed here by TWILIO_API_BASE_URL, sends its replies
through the same REST call it makes to Twilio, so every outbound message appears in the page
as it is sent, images included (each in its owner's conversation: with `--owners N` the page
lets you pick which owner you write as); quick-reply buttons (the relay makes them through the Content
API, served here as by `fakes/twilio.py`) show under their message, and a tap posts what
Twilio posts (`ButtonPayload`, `ButtonText`). A photo or file attached on the page is held here as Twilio
holds media: the webhook names it with `MediaUrl0` under this server's Twilio API path, which
needs Basic auth and redirects to the file (`/cdn/...`), as Twilio's redirects to its CDN.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import re
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
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from fakes.twilio import create_content, list_contents, render_content

PAGE = Path(__file__).with_name("page.html")
MAX_TEXT = 4096
MAX_FILE = 16 * 1024 * 1024  # WhatsApp's limit for media (the relay takes 5 MB per image)


@dataclass(frozen=True)
class Held:
    """A file attached on the page, held as Twilio holds a message's media."""

    data: bytes
    content_type: str
    name: str
    token: str  # its unguessable name at `/cdn/` (Twilio's CDN, here)


@dataclass
class ChatMessage:
    id: int
    sender: str  # "owner" or "textslash"
    body: str
    media: list[str]
    at: float
    buttons: list[dict[str, str]] = field(default_factory=list)  # quick replies: {id, title}
    owner: str = ""  # whose conversation it is in (the sender, or the recipient of textslash's)


@dataclass
class Chat:
    """The owners' conversations with the relay, as the local page shows them."""

    relay_url: str
    public_url: str  # what the relay's PUBLIC_URL is: signatures are made against it
    account_sid: str
    auth_token: str = field(repr=False)
    owner: str  # the one the page writes as until told otherwise
    bot_number: str
    http: httpx.AsyncClient
    demo: bool = False
    api_url: str = ""  # this server, as the relay's TWILIO_API_BASE_URL: "" when the relay uses real Twilio
    owners: tuple[str, ...] = ()  # who the page may write as (`--owners N`); (): `owner` alone
    messages: list[ChatMessage] = field(default_factory=list)
    media: dict[str, Held] = field(default_factory=dict)  # by media sid
    contents: dict[str, dict[str, Any]] = field(default_factory=dict)  # the Content API's, by SID
    # WhatsApp's 24-hour window, to try (relay/window.py): the page's "24 h later" closes it, so
    # free-form sends fail with 63016 as Twilio's would; the approved template still goes; the
    # owner's next message opens it again.
    template_sid: str = ""
    window_closed: bool = False
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
                Route("/api/window", self._close_window, methods=["POST"]),
                Route("/2010-04-01/Accounts/{sid}/Messages.json", self._twilio_create, methods=["POST"]),
                Route("/v1/Content", self._content_create, methods=["POST"]),
                Route("/v1/Content", self._content_list, methods=["GET"]),
                Route("/2010-04-01/Accounts/{sid}/Messages/{message}/Media/{media}", self._twilio_media),
                Route("/cdn/{token}/{name}", self._cdn),
            ]
        )

    def _add(
        self, sender: str, body: str, media: list[str], buttons: list[dict[str, str]] | None = None, *, owner: str
    ) -> ChatMessage:
        message = ChatMessage(next(self._ids), sender, body, media, time.time(), buttons or [], owner)
        self.messages.append(message)
        self._changed.set()
        self._changed = anyio.Event()
        return message

    async def _page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def _info(self, request: Request) -> JSONResponse:
        window = bool(self.api_url)  # only while this page is Twilio for the relay
        info = {"owner": self.owner, "owners": list(self.owners or (self.owner,)), "demo": self.demo}
        return JSONResponse({**info, "attach": bool(self.api_url), "window": window})

    def add_template(self, body: str) -> str:
        """An approved WhatsApp template with one variable (as DEPLOY.md suggests); its SID."""
        self.template_sid = "HX" + secrets.token_hex(16)
        self.contents[self.template_sid] = {"sid": self.template_sid, "types": {"twilio/text": {"body": body}}}
        return self.template_sid

    async def _close_window(self, request: Request) -> JSONResponse:
        if not self.api_url:
            return JSONResponse({"detail": "the relay sends through real Twilio here"}, status_code=409)
        self.window_closed = True
        return JSONResponse({"closed": True})

    async def _send(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
            text = str(body["text"]).strip()
            held = self._hold(body.get("file"))
            button = str(body.get("button") or "")
            replied = int(body.get("replied_to") or 0)  # the message whose button was tapped
            owner = str(body.get("as") or self.owner)  # who writes (`--owners N`)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else 'expected {"text": ..., "file"?: {name, type, data}}'
            return JSONResponse({"detail": detail}, status_code=400)
        if not (text or held) or len(text) > MAX_TEXT:
            return JSONResponse({"detail": f"a message has up to {MAX_TEXT} characters, or a file"}, status_code=400)
        if owner not in (self.owners or (self.owner,)):
            return JSONResponse({"detail": f"{owner!r} is not one of this chat's owners"}, status_code=400)
        params = {
            "MessageSid": "SM" + secrets.token_hex(16),
            "AccountSid": self.account_sid,
            "From": f"whatsapp:{owner}",
            "To": f"whatsapp:{self.bot_number}",
            "Body": text,
            "NumMedia": "0",
            "ProfileName": "You",
        }
        if button:  # a tapped quick reply: its title as the body, its id as the payload
            params.update(ButtonPayload=button, ButtonText=text)
            if replied:  # and the message it was under, as Twilio names it (stale taps are refused)
                params["OriginalRepliedMessageSid"] = _message_sid(replied)
        shown: list[str] = []
        if held is not None:
            sid = "ME" + secrets.token_hex(16)
            self.media[sid] = held
            media = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{params['MessageSid']}/Media/{sid}"
            params.update(NumMedia="1", MediaUrl0=self.api_url + media, MediaContentType0=held.content_type)
            shown.append(f"/cdn/{held.token}/{held.name}")
        self._add("owner", text, shown, owner=owner)
        self.window_closed = False  # the owner wrote: WhatsApp's 24 hours start again
        signature = RequestValidator(self.auth_token).compute_signature(f"{self.public_url}/webhook", params)
        try:
            response = await self.http.post(
                f"{self.relay_url}/webhook", data=params, headers={"X-Twilio-Signature": signature}, timeout=10.0
            )
        except httpx.HTTPError as exc:
            self._add("textslash", f"⚠️ The relay is not answering ({type(exc).__name__}).", [], owner=owner)
            return JSONResponse({"detail": "relay unreachable"}, status_code=502)
        return JSONResponse({"relay_status": response.status_code})

    def _hold(self, file: Any) -> Held | None:
        """The file attached on the page (`{name, type, data}`, data in base64), or None."""
        if file is None:
            return None
        if not self.api_url:
            raise ValueError("attachments go through Twilio here: send them from your phone")
        data = base64.b64decode(str(file["data"]), validate=True)
        content_type = str(file.get("type") or "application/octet-stream").lower()
        if len(data) > MAX_FILE or not re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", content_type):
            raise ValueError(f"a file of at most {MAX_FILE // 1024 // 1024} MB, with a media type")
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(file.get("name") or "file"))[-100:].lstrip(".") or "file"
        return Held(data, content_type, name, secrets.token_urlsafe(16))

    async def _twilio_media(self, request: Request) -> Response:
        """Twilio's media URL: Basic auth, then a redirect to the file (as Twilio's to its CDN)."""
        if not self._authorized(request) or request.path_params["sid"] != self.account_sid:
            return _unauthorized()
        held = self.media.get(request.path_params["media"])
        if held is None:
            return JSONResponse({"code": 20404, "message": "Not found", "status": 404}, status_code=404)
        return RedirectResponse(f"/cdn/{held.token}/{held.name}", status_code=302)

    async def _cdn(self, request: Request) -> Response:
        held = next((h for h in self.media.values() if h.token == request.path_params["token"]), None)
        if held is None:
            return Response("not found", status_code=404)
        return Response(held.data, media_type=held.content_type)

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

    def _authorized(self, request: Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return hmac.compare_digest(request.headers.get("authorization", ""), f"Basic {expected}")

    async def _content_create(self, request: Request) -> Response:
        if not self._authorized(request):
            return _unauthorized()
        return await create_content(self.contents, self.account_sid, request)

    async def _content_list(self, request: Request) -> Response:
        return list_contents(self.contents) if self._authorized(request) else _unauthorized()

    async def _twilio_create(self, request: Request) -> Response:
        """Twilio's `Messages.json`, as the relay's twilio client calls it."""
        if not self._authorized(request) or request.path_params["sid"] != self.account_sid:
            return _unauthorized()
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        fields: dict[str, Any] = dict(form)
        body, buttons = fields.get("Body", ""), list[dict[str, str]]()
        if self.window_closed and not (self.template_sid and fields.get("ContentSid") == self.template_sid):
            refusal = "Failed to send freeform message because you are outside the allowed window"
            return JSONResponse({"code": 63016, "message": refusal, "status": 400}, status_code=400)
        if fields.get("ContentSid"):
            rendered = render_content(self.contents, fields)
            if isinstance(rendered, Response):
                return rendered
            body, buttons = rendered[0], [{"id": i, "title": t} for i, t in rendered[1]]
        recipient = str(fields.get("To", "")).removeprefix("whatsapp:")
        message = self._add("textslash", body, [v for k, v in form if k == "MediaUrl"], buttons, owner=recipient)
        sid = _message_sid(message.id)
        return JSONResponse(
            {
                "sid": sid,
                "status": "queued",
                "to": fields.get("To"),
                "from": fields.get("From"),
                "body": body,
                "account_sid": self.account_sid,
            },
            status_code=201,
        )


def _message_sid(message_id: int) -> str:
    return f"SM{message_id:032d}"


def _unauthorized() -> JSONResponse:
    return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
