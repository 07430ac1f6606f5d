"""Everything that speaks Twilio: the webhook signature, message splitting, and sending.

Sending goes through the official SDK's async REST client (aiohttp), on the event loop: no
threads contending with the loop for the GIL. The SDK has no base-URL option, so a small
`AsyncTwilioHttpClient` subclass rewrites every Twilio host it calls (`api.twilio.com`,
`content.twilio.com`) to `TWILIO_API_BASE_URL`; that is the supported hook (the SDK's custom
HTTP client) and where tests plug in a loopback fake, which serves both APIs' paths.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from relay.buttons import QuickReplies

logger = logging.getLogger(__name__)

WHATSAPP_LIMIT = 1600
BUTTONS_LIMIT = 1024  # the body of a quick-reply message (Twilio's Content API)
# What Twilio refuses in a Content variable, which is how a quick reply's body is sent: a line
# break, a tab or more than four spaces in a row (error 21656).
_NOT_A_VARIABLE = re.compile(r"[\n\t]| {5,}")
TWILIO_HOSTS = re.compile(r"^https://(?:api|content)\.twilio\.com(?=/)")
# Statuses worth another try: Twilio is down or busy. Other 4xx are permanent refusals
# (63016 outside the 24-hour window, 63015 not joined to the sandbox, 21211 bad number...).
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
OUTSIDE_WINDOW = 63016  # a free-form message after WhatsApp's 24-hour window (relay/window.py)


def signature_is_valid(*, auth_token: str, url: str, params: Mapping[str, Any], signature: str | None) -> bool:
    """Check `X-Twilio-Signature` against the public URL Twilio was configured with."""
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, params, signature))


def fits_a_quick_reply(body: str) -> bool:
    """Whether `body` can be a quick reply's own text: one line, not empty, and short enough."""
    return bool(body.strip()) and len(body) <= BUTTONS_LIMIT and not _NOT_A_VARIABLE.search(body)


def split_body(body: str, limit: int = WHATSAPP_LIMIT) -> list[str]:
    """Split a long body on line breaks into parts numbered "(1/3)" that each fit `limit`."""
    if len(body) <= limit:
        return [body]
    room = limit - len("(99/99) ")
    chunks: list[str] = []
    current = ""
    for line in _fitting_lines(body, room):
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > room:
            chunks.append(current)
            candidate = line
        current = candidate
    if current:
        chunks.append(current)
    return [f"({i}/{len(chunks)}) {chunk}" for i, chunk in enumerate(chunks, 1)]


def _fitting_lines(body: str, room: int) -> list[str]:
    """Lines of the body, any line longer than `room` cut at spaces (or hard, if it has none)."""
    lines: list[str] = []
    for line in body.split("\n"):
        while len(line) > room:
            cut = line.rfind(" ", 0, room)
            cut = cut if cut > room // 2 else room
            lines.append(line[:cut])
            line = line[cut:].lstrip(" ")
        lines.append(line)
    return lines


@dataclass(frozen=True)
class SendResult:
    sid: str = ""
    retryable: bool = False
    error_code: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.sid)


class _BaseUrlHttpClient(AsyncTwilioHttpClient):
    """The SDK's aiohttp client, pointed at `base_url`, with a deadline on every request."""

    def __init__(self, base_url: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.base_url = base_url.rstrip("/")

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK calls this signature
        allow_redirects: bool = False,
    ) -> Response:
        url = TWILIO_HOSTS.sub(self.base_url, url, count=1)
        # aiohttp deprecates `auth` and `BasicAuth` (a warning on every send): send the header.
        headers = dict(headers or {})
        if auth is not None:
            headers["Authorization"] = _basic_auth(*auth)
        if headers.get("Content-Type") == "application/json" and isinstance(data, dict):
            # The SDK's sync client sends a JSON body for these (the Content API); its async one
            # hands aiohttp the dict, which aiohttp form-encodes under the JSON header.
            data = json.dumps(data)  # type: ignore[assignment]
        # The SDK hands aiohttp the caller's timeout, None by default, which aiohttp takes for
        # "no deadline at all": a hung Twilio would hold the send forever. Ours is the default.
        return await super().request(method, url, params, data, headers, None, timeout or self.timeout, allow_redirects)


def _basic_auth(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


class TwilioSender:
    """Sends one WhatsApp message per call, at most `concurrency` at a time.

    Construct it anywhere; open it (`async with sender:`) on the event loop that sends, because
    the aiohttp session belongs to that loop. The relay's lifespan opens and closes it.
    """

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_number: str,
        base_url: str,
        media_base_url: str,
        timeout: float = 10.0,
        concurrency: int = 4,
        status_callback: str = "",
    ) -> None:
        """`status_callback`: the signed route Twilio reports each message's fate to (its
        63016 usually comes that way, after the REST call said "queued")."""
        self._credentials = (account_sid, auth_token)
        self._base_url = base_url
        self._timeout = timeout
        self._from = f"whatsapp:{from_number}"
        self._media_base = media_base_url.rstrip("/")
        self._status_callback = status_callback
        # A burst of replies to many owners goes out a few at a time, not all at once at Twilio.
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._http: _BaseUrlHttpClient | None = None
        self._messages: Any = None
        self._contents: Any = None
        self.quick_replies = QuickReplies()

    async def __aenter__(self) -> TwilioSender:
        self._http = _BaseUrlHttpClient(self._base_url, self._timeout)
        client = Client(*self._credentials, http_client=self._http)
        # `client.messages` walks the SDK's lazily imported domains on every access; profiled,
        # that was once the relay's largest cost per send. Resolve it once.
        self._messages = client.messages
        self._contents = client.content.v1.contents
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        http, self._http, self._messages, self._contents = self._http, None, None, None
        if http is not None:
            await http.close()

    async def send(self, to: str, body: str, media: Sequence[str], buttons: str = "") -> SendResult:
        """One message; with `buttons` ("decide", "cancel") as a quick reply, and as plain text
        when the buttons cannot be made or sent (the text says what to type anyway)."""
        if self._messages is None:
            raise RuntimeError("TwilioSender is not open: use `async with sender:`")
        kwargs: dict[str, Any] = {"from_": self._from, "to": f"whatsapp:{to}", "body": body}
        if media:
            kwargs["media_url"] = [f"{self._media_base}/{name}" for name in media]
        if buttons and (sid := await self.quick_replies.sid(self._contents, buttons)) is not None:
            quick = {"from_": self._from, "to": f"whatsapp:{to}", "content_sid": sid}
            result = await self._create({**quick, "content_variables": json.dumps({"1": body})})
            if result.ok or result.retryable or result.error_code == OUTSIDE_WINDOW:
                return result  # (outside the window, plain text would be refused just the same)
            self.quick_replies.failed(f"Twilio refused a message with buttons ({result.error})")
        return await self._create(kwargs)

    async def send_template(self, to: str, content_sid: str, variables: Mapping[str, str]) -> SendResult:
        """An approved template (a Content SID): what WhatsApp lets through outside the window."""
        if self._messages is None:
            raise RuntimeError("TwilioSender is not open: use `async with sender:`")
        kwargs = {"from_": self._from, "to": f"whatsapp:{to}", "content_sid": content_sid}
        return await self._create({**kwargs, "content_variables": json.dumps(dict(variables))})

    async def _create(self, kwargs: dict[str, Any]) -> SendResult:
        if self._status_callback:
            kwargs = {**kwargs, "status_callback": self._status_callback}
        try:
            async with self._limiter:
                message = await self._messages.create_async(**kwargs)
        except TwilioRestException as exc:
            retryable = exc.status in RETRYABLE_STATUS
            return SendResult(retryable=retryable, error_code=exc.code, error=f"HTTP {exc.status}: {exc.msg}"[:300])
        except Exception as exc:  # timeouts, refused connections, broken responses: try again later
            return SendResult(retryable=True, error=f"{type(exc).__name__}")
        return SendResult(sid=message.sid or "unknown")
