"""A loopback fake of Twilio's REST APIs that records sends and can be told to fail: Messages,
the Content API's quick replies, and inbound media (`GET .../Media/<sid>` needs Basic auth and
redirects (302) to the file on a second loopback server standing in for Twilio's CDN,
`cdn_app`, as the real one does). The APIs answer on one base URL, as the relay's
TWILIO_API_BASE_URL seam sends them there (their paths do not overlap).

WhatsApp's 24-hour window: `close_window(number)` makes free-form sends to that number fail
with 63016, as Twilio does once the user last wrote more than 24 hours ago: at once (a 400) or,
as is usual on WhatsApp, afterwards (201 "queued", then a `failed` status callback signed with
the auth token, posted to `status_target`). An approved template (`add_template`) always goes;
a quick reply (Content made through the API, not approved) does not."""

from __future__ import annotations

import base64
import itertools
import json
import random
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import anyio
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator

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
    content_sid: str = ""
    buttons: list[str] = field(default_factory=list)  # the quick-reply ids a content message showed


QUICK_REPLY_BODY_LIMIT = 1024  # Twilio refuses a longer quick-reply body
# Twilio refuses a Content variable that is empty or holds a line break, a tab or more than four
# spaces in a row (error 21656, twilio.com/docs/api/errors/21656).
BAD_VARIABLE = re.compile(r"^\s*$|[\n\t]| {5,}")


@dataclass
class Media:
    data: bytes
    content_type: str
    filename: str
    chunked: bool
    token: str  # the CDN's unguessable name for it


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
    contents: dict[str, dict[str, Any]] = field(default_factory=dict)  # Content API resources by SID
    content_down: bool = False  # the Content API answers 500 (creating and listing)
    refuse_content_sends: bool = False  # a message with a ContentSid is refused (400), as for a bad one
    templates: set[str] = field(default_factory=set)  # approved templates' SIDs
    _sids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Media: the base URLs the harness serves `app()` and `cdn_app()` at, the files by media
    # sid, and every request each side got (path, its Authorization header).
    api_url: str = ""
    cdn_url: str = ""
    media: dict[str, Media] = field(default_factory=dict)
    media_requests: list[tuple[str, str]] = field(default_factory=list)
    cdn_requests: list[tuple[str, str]] = field(default_factory=list)
    cdn_hold: anyio.Event | None = None  # set: the CDN holds every download until it is set
    # WhatsApp's window: numbers ("whatsapp:+1...") whose window is closed, and how a free-form
    # send to one fails: "sync" (400, 63016) or "async" (201, then a failed status callback).
    closed: dict[str, str] = field(default_factory=dict)
    refused: list[Sent] = field(default_factory=list)  # taken (201) but failed: never reached the phone
    status_target: str = ""  # where the app that sent the messages listens (StatusCallback's path there)
    status_posts: list[tuple[dict[str, str], int]] = field(default_factory=list)  # (form, HTTP status) posted
    status_first: bool = False  # post a failure's callback before answering the send (they race at Twilio)
    answer_hold: anyio.Event | None = None  # set: a message's answer, decided, waits until it is set (a slow Twilio)

    def close_window(self, number: str, how: str = "sync") -> None:
        """The owner `number` (E.164) last wrote more than 24 hours ago."""
        self.closed[f"whatsapp:{number}"] = how

    def open_window(self, number: str) -> None:
        """The owner wrote: free-form messages go again for 24 hours."""
        self.closed.pop(f"whatsapp:{number}", None)

    def add_template(self, body: str, sid: str = "") -> str:
        """An approved WhatsApp template (`twilio/text`, `{{1}}` variables); returns its Content SID."""
        sid = sid or f"HX{secrets.token_hex(16)}"
        self.contents[sid] = {"sid": sid, "friendly_name": "window", "types": {"twilio/text": {"body": body}}}
        self.templates.add(sid)
        return sid

    def templates_sent(self, to: str | None = None) -> list[Sent]:
        mine = [m for m in self.messages if to is None or m.to == f"whatsapp:{to}"]
        return [m for m in mine if m.content_sid in self.templates]

    def add_media(self, data: bytes, content_type: str, *, filename: str = "", chunked: bool = False) -> str:
        """A file Twilio holds for an inbound message; returns its media URL, as a webhook names it.
        `chunked`: the CDN sends it without a Content-Length (the relay must cap the stream)."""
        sid = f"ME{secrets.token_hex(16)}"
        self.media[sid] = Media(data, content_type, filename, chunked, secrets.token_urlsafe(16))
        return f"{self.api_url}/2010-04-01/Accounts/{self.account_sid}/Messages/MM{secrets.token_hex(16)}/Media/{sid}"

    def fail_next(self, *answers: Scripted) -> None:
        self.script.extend(answers)

    def bodies(self, to: str | None = None) -> list[str]:
        return [m.body for m in self.messages if to is None or m.to == f"whatsapp:{to}"]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/2010-04-01/Accounts/{sid}/Messages.json", self._create, methods=["POST"]),
                Route("/v1/Content", self._content_create, methods=["POST"]),
                Route("/v1/Content", self._content_list, methods=["GET"]),
                Route("/2010-04-01/Accounts/{sid}/Messages/{message}/Media/{media}", self._media, methods=["GET"]),
            ]
        )

    def cdn_app(self) -> Starlette:
        return Starlette(routes=[Route("/files/{token}", self._cdn, methods=["GET"])])

    def _authorized(self, request: Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return request.headers.get("authorization") == f"Basic {expected}"

    async def _content_create(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _twilio_error(401, 20003, "Authenticate")
        if self.content_down:
            return _twilio_error(500, None, "outage")
        return await create_content(self.contents, self.account_sid, request)

    async def _content_list(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _twilio_error(401, 20003, "Authenticate")
        if self.content_down:
            return _twilio_error(500, None, "outage")
        return list_contents(self.contents)

    def _render(self, fields: dict[str, Any]) -> tuple[str, list[str]] | JSONResponse:
        if self.refuse_content_sends:
            return _twilio_error(400, 21655, "The ContentSid is invalid")
        rendered = render_content(self.contents, fields)
        return rendered if isinstance(rendered, JSONResponse) else (rendered[0], [i for i, _ in rendered[1]])

    async def _media(self, request: Request) -> Response:
        self.media_requests.append((request.url.path, request.headers.get("authorization", "")))
        if not self._authorized(request) or request.path_params["sid"] != self.account_sid:
            return _twilio_error(401, 20003, "Authenticate")
        item = self.media.get(request.path_params["media"])
        if item is None:
            return _twilio_error(404, 20404, "The requested resource was not found")
        return RedirectResponse(f"{self.cdn_url}/files/{item.token}", status_code=302)

    async def _cdn(self, request: Request) -> Response:
        self.cdn_requests.append((request.url.path, request.headers.get("authorization", "")))
        item = next((m for m in self.media.values() if m.token == request.path_params["token"]), None)
        if item is None:
            return Response("not found", status_code=404)
        if self.cdn_hold is not None:
            await self.cdn_hold.wait()
        headers = {"Content-Disposition": f'attachment; filename="{item.filename}"'} if item.filename else {}
        if item.chunked:

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(item.data), 65536):
                    yield item.data[start : start + 65536]

            return StreamingResponse(chunks(), media_type=item.content_type, headers=headers)
        return Response(item.data, media_type=item.content_type, headers=headers)

    async def _create(self, request: Request) -> JSONResponse:
        self.attempts += 1
        self.in_flight += 1
        try:
            answer = await self._answer(request)
            if (hold := self.answer_hold) is not None:
                await hold.wait()
            return answer
        finally:
            self.in_flight -= 1

    async def _answer(self, request: Request) -> JSONResponse:
        if not self._authorized(request) or request.path_params["sid"] != self.account_sid:
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
        body, buttons = fields.get("Body", ""), list[str]()
        outside = self.closed.get(fields.get("To", "")) if fields.get("ContentSid") not in self.templates else None
        if outside == "sync":
            return _twilio_error(400, 63016, "Failed to send freeform message because you are outside the window")
        if fields.get("ContentSid"):
            rendered = self._render(fields)
            if isinstance(rendered, JSONResponse):
                return rendered
            body, buttons = rendered
        sid = f"SM{next(self._sids):032d}"
        sent = Sent(
            to=fields.get("To", ""),
            from_=fields.get("From", ""),
            body=body,
            media=[v for k, v in form if k == "MediaUrl"],
            at=time.monotonic(),
            sid=sid,
            content_sid=fields.get("ContentSid", ""),
            buttons=buttons,
        )
        background = None
        if outside:  # queued, then failed: Twilio says so through the message's status callback
            self.refused.append(sent)
            if (callback := fields.get("StatusCallback", "")) and self.status_first:
                await self.post_status(callback, sent, "failed", 63016)  # before the sender knows the SID
            elif callback:
                background = BackgroundTask(self.post_status, callback, sent, "failed", 63016)
        else:
            self.messages.append(sent)
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
            background=background,
        )

    async def post_status(self, callback: str, sent: Sent, status: str, code: int | None = None) -> int:
        """Post a status callback for `sent` the way Twilio does: a form signed for the callback
        URL the sender gave, delivered to `status_target` (its path and query kept)."""
        form = {
            "MessageSid": sent.sid,
            "SmsSid": sent.sid,
            "AccountSid": self.account_sid,
            "From": sent.from_,
            "To": sent.to,
            "MessageStatus": status,
            "SmsStatus": status,
            "ChannelPrefix": "whatsapp",
            "ApiVersion": "2010-04-01",
        }
        if code is not None:
            form["ErrorCode"] = str(code)
        signature = RequestValidator(self.auth_token).compute_signature(callback, form)
        parts = httpx.URL(callback)
        target = self.status_target + parts.raw_path.decode()
        try:
            async with httpx.AsyncClient() as client:
                response = await client.post(target, data=form, headers={"X-Twilio-Signature": signature})
            answer = response.status_code
        except httpx.HTTPError:
            answer = 0  # best effort, as Twilio's own
        self.status_posts.append((form, answer))
        return answer


# --- the Content API's quick replies, shared with the local console (console/chat.py) ---------


async def create_content(contents: dict[str, dict[str, Any]], account_sid: str, request: Request) -> JSONResponse:
    """`POST /v1/Content` for a `twilio/quick-reply`: a JSON body, a name, 1 to 3 actions."""
    if request.headers.get("content-type", "").split(";")[0] != "application/json":
        return _twilio_error(400, 20001, "expected a JSON body")
    try:
        body = json.loads(await request.body())
        actions = body["types"]["twilio/quick-reply"]["actions"]
        valid = isinstance(body["friendly_name"], str) and 1 <= len(actions) <= 3
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        return _twilio_error(400, 20001, "a quick reply needs a name and 1 to 3 actions")
    sid = f"HX{len(contents) + 1:032d}"
    contents[sid] = {**body, "sid": sid, "account_sid": account_sid}
    return JSONResponse(contents[sid], status_code=201)


def list_contents(contents: dict[str, dict[str, Any]]) -> JSONResponse:
    meta = {"key": "contents", "page": 0, "page_size": 50, "next_page_url": None, "previous_page_url": None}
    return JSONResponse({"contents": list(contents.values()), "meta": meta})


def render_content(
    contents: dict[str, dict[str, Any]], fields: dict[str, Any]
) -> tuple[str, list[tuple[str, str]]] | JSONResponse:
    """A content message's body (its `{{n}}` filled in) and buttons as (id, title), or Twilio's
    refusal."""
    content = contents.get(fields.get("ContentSid", ""))
    if content is None:
        return _twilio_error(400, 21655, "The ContentSid is invalid")
    try:
        variables = json.loads(fields.get("ContentVariables") or "{}")
        if any(BAD_VARIABLE.search(str(value)) for value in variables.values()):
            return _twilio_error(400, 21656, "The ContentVariables Parameter is invalid")
        # A `twilio/text` (the approved template the 24-hour window needs) has a body alone.
        quick = content["types"].get("twilio/text") or content["types"]["twilio/quick-reply"]
        body = re.sub(r"\{\{(\w+)\}\}", lambda m: str(variables.get(m.group(1), "")), quick["body"])
        buttons = [(str(a["id"]), str(a["title"])) for a in quick.get("actions", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return _twilio_error(400, 21656, "The ContentVariables are invalid")
    if len(body) > QUICK_REPLY_BODY_LIMIT:
        return _twilio_error(400, 21656, "The quick reply's body is over 1024 characters")
    return body, buttons


def _twilio_error(status: int, code: int | None, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "more_info": "", "status": status}, status_code=status)
